"""The activation store's files: manifest records, atomic JSON, checksums, and the errors.

Apart from `engine.store` so the writer (`engine.store_writer`) and the store share them
without importing each other: every way a file can be read wrongly or left half-written ends
here in a StoreError that names the file and the way out.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from engine.keys import Key

DTYPE = np.dtype(np.float32)
RECOVER_WRITE = ("Free disk space (or choose a writable output directory) and run again: "
                 "completed representations are kept and extraction resumes where it stopped")


class StoreError(ValueError):
  """A store that cannot be used as asked (other metadata, incomplete or corrupt data, locked)."""


@dataclasses.dataclass
class Entry:
  """The manifest's record of one representation."""
  key: Key
  file: str
  shape: tuple[int, int]
  complete: bool = False
  sha256: str | None = None

  def to_json(self) -> dict:
    return {"language": self.key.language, "modality": self.key.modality, "site": self.key.site,
            "layer": self.key.layer, "file": self.file, "shape": list(self.shape),
            "dtype": DTYPE.name, "complete": self.complete, "sha256": self.sha256}

  @classmethod
  def from_json(cls, d: Mapping) -> "Entry":
    key = Key(d["language"], d["modality"], d["site"], int(d["layer"]))
    return cls(key, d["file"], tuple(d["shape"]), bool(d["complete"]), d.get("sha256"))


def canonical(obj: Any) -> Any:
  """JSON round trip, so metadata compares the same before and after being written."""
  return json.loads(json.dumps(obj, sort_keys=True, default=_jsonable))


def normalized(metadata: Mapping) -> dict:
  """Metadata as the manifest holds it: canonical JSON, with the arrays' dtype."""
  return canonical({**dict(metadata), "dtype": DTYPE.name})


def _jsonable(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (set, frozenset)):
    return sorted(x)
  return str(x)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
  """Writes JSON to a temporary file, then os.replace: a reader sees the old or the new file."""
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise StoreError(f"cannot write {path}: {reason(e)}; {path.name} is left as it was. "
                     f"{RECOVER_WRITE}") from e


def reason(e: OSError) -> str:
  """Why an OS call failed, in words (a full disk said as such)."""
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return "no space left on the device"
  return e.strerror or str(e)


def manifest_checksum(manifest: Mapping) -> str:
  """sha256 of the manifest without its checksum field, in canonical JSON."""
  body = {k: v for k, v in manifest.items() if k != "checksum"}
  text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe_difference(stored: Any, given: Any, prefix: str = "") -> str:
  """'pooling: "mean" (store) vs "max" (this run); model.dtype: ...' (nested dicts by path)."""
  if isinstance(stored, Mapping) and isinstance(given, Mapping):
    parts = []
    for field in sorted(set(stored) | set(given)):
      a, b = stored.get(field, "<absent>"), given.get(field, "<absent>")
      if a != b:
        parts.append(describe_difference(a, b, f"{prefix}{field}."))
    return "; ".join(parts)
  return f"{prefix.rstrip('.')}: {_short(stored)} (store) vs {_short(given)} (this run)"


def _short(x: Any, limit: int = 80) -> str:
  text = json.dumps(x, sort_keys=True, ensure_ascii=False)
  return text if len(text) <= limit else text[:limit - 3] + "..."
