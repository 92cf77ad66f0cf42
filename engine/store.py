"""The activation store: one [n, d] float32 array per representation, written as batches stream.

A representation is keyed by (language, modality, site, layer); its rows are the corpus
sentences in id order (`metadata['ids']`). A store is a directory:

  manifest.json               metadata + every representation's file, shape, state, sha256,
                              and the manifest's own checksum
  {language}.{modality}.{site}.{layer}.npy        the [n, d] array (a preallocated .npy)
  {language}.{modality}.{site}.{layer}.done.npy   [n] uint64: per row written so far, a tag
                                                  holding the row's crc32 (0: not written)
  .lock                       held (flock) by the one process writing

Why it is crash-safe: rows are written into the memory-mapped array and flushed *before* their
tags in `.done.npy` are set, so a tag never claims a row that is not on disk; a killed run
leaves at worst rows that are recomputed (and representations begun after the last `sync`,
which start over). A resumed writer re-checks every tagged row against its crc32, so a row
damaged on disk (or a flipped tag) is recomputed, not trusted. A representation becomes complete
once every row is tagged and checks out: its sha256 goes into the manifest (written to a
temporary file, then os.replace), and only then is its `.done.npy` removed. Readers see complete
representations only, `load` checks the sha256, and the manifest carries a checksum of itself,
so half-written or damaged data is never returned: every failure is a StoreError naming the
file and the way out. Arrays are preallocated on disk when begun, so a full disk shows up
then, as an error, rather than as SIGBUS in a memory-mapped write. Memory stays bounded by the
batch: arrays live on disk and are touched through memory maps.

Reopening a store checks its metadata (model, pooling, languages, sentence ids, dtype, ...):
a different one is refused rather than mixed in.

This module is the store as a whole (opening, locking, reading, completing); the manifest's
records, checksums and errors are engine.store_files, and one array being written (row tags,
preallocation) is engine.store_writer. Their names are re-exported here.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from numpy.lib.format import open_memmap

from engine.keys import Key, as_key
from engine.store_files import (DTYPE, RECOVER_WRITE, Entry, StoreError, canonical,
                                describe_difference, file_sha256, manifest_checksum, normalized,
                                reason, write_json_atomic)
from engine.store_writer import TAG, Writer, allocate, row_tags

__all__ = ["DTYPE", "FORMAT_VERSION", "LOCK", "MANIFEST", "TAG", "Entry", "Key", "Store",
           "StoreError", "Writer", "as_key", "canonical", "file_sha256", "open_store",
           "row_tags", "to_jax"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
# Manifests written before they carried a checksum are read without one.
_MANIFEST_FIELDS = {"format", "metadata", "representations", "skipped", "checksum"}


class Store:
  """An activation store directory; see the module doc. Open with `Store.open`."""

  def __init__(self, path: Path, metadata: dict, entries: dict[Key, Entry], skipped: dict,
               writable: bool, lock_file=None):
    self.path = path
    self.metadata = metadata
    self._entries = entries
    self._skipped = skipped
    self.writable = writable
    self._lock_file = lock_file
    self._verified: dict[Key, tuple] = {}
    self._dirty = False

  # -- opening --------------------------------------------------------------------------------

  @classmethod
  def open(cls, path: str | os.PathLike, metadata: Mapping | None = None, *,
           mode: str = "a") -> "Store":
    """Opens a store. mode 'r': read an existing store; 'a': create it or resume writing it.

    `metadata` must hold 'ids' (the sentence ids, i.e. the rows) for a new store; anything
    else JSON-able may be added (model, pooling, languages, dtype, ...). Given for an existing
    store it must equal the stored metadata, or StoreError says which fields differ.
    """
    if mode not in ("r", "a"):
      raise ValueError(f"store mode must be 'r' or 'a', got {mode!r}")
    path = Path(path)
    manifest_path = path / MANIFEST
    if mode == "r" and not manifest_path.exists():
      raise StoreError(f"no activation store at {path} (missing {MANIFEST})")
    lock_file = None
    if mode == "a":
      try:
        path.mkdir(parents=True, exist_ok=True)
        lock_file = cls._lock(path)
      except OSError as e:
        raise StoreError(f"cannot write activation store {path}: {reason(e)} "
                         f"({e.filename or path}); choose a writable output directory") from e
      for stale in path.glob(f".{MANIFEST}.*.tmp"):  # left by a run killed while writing
        stale.unlink(missing_ok=True)
    try:
      if manifest_path.exists():
        store = cls._read(path, mode == "a", lock_file)
        if metadata is not None:
          store.check_metadata(metadata)
        return store
      if metadata is None or "ids" not in metadata:
        raise StoreError(f"creating activation store {path} needs metadata with the sentence 'ids'")
      ids = list(metadata["ids"])
      if len(set(ids)) != len(ids):
        raise StoreError(f"sentence ids of store {path} repeat")
      store = cls(path, normalized(metadata), {}, {}, True, lock_file)
      store._write_manifest()
      return store
    except BaseException:
      if lock_file is not None:
        lock_file.close()
      raise

  @staticmethod
  def _lock(path: Path):
    f = open(path / LOCK, "a+", encoding="utf-8")
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise StoreError(f"activation store {path} is being written by {holder}; wait for it to "
                       "finish or use another output directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    return f

  @classmethod
  def _read(cls, path: Path, writable: bool, lock_file) -> "Store":
    file = path / MANIFEST
    damaged = (f"the store's index is damaged, so none of its arrays can be trusted: delete "
               f"{path} and extract again (or restore {MANIFEST} from a copy)")
    try:
      manifest = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
      raise StoreError(f"{file} is corrupt (not UTF-8 text: {e.reason}); {damaged}") from None
    except json.JSONDecodeError as e:
      raise StoreError(f"{file} is corrupt or truncated ({e}); {damaged}") from None
    except OSError as e:
      raise StoreError(f"cannot read {file}: {reason(e)}") from None
    if not isinstance(manifest, dict):
      raise StoreError(f"{file} is corrupt (not a JSON object); {damaged}")
    if manifest.get("format") != FORMAT_VERSION:
      raise StoreError(f"{file} has format {manifest.get('format')!r}; this engine "
                       f"reads format {FORMAT_VERSION}")
    unknown = sorted(set(manifest) - _MANIFEST_FIELDS)
    if unknown:
      raise StoreError(f"{file} is corrupt (unknown fields {unknown}); {damaged}")
    if "checksum" in manifest and manifest["checksum"] != manifest_checksum(manifest):
      raise StoreError(f"{file} does not match its own checksum (modified or corrupt); {damaged}")
    entries = {}
    try:
      for d in manifest.get("representations", {}).values():
        entry = Entry.from_json(d)
        entries[entry.key] = entry
      metadata, skipped = manifest["metadata"], manifest.get("skipped", {})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise StoreError(f"{file} is corrupt (bad field: {e!r}); {damaged}") from None
    gone = []
    if writable:
      # A complete representation whose file was deleted (the way to have a damaged one
      # recomputed) is forgotten, so extraction runs it again; tags left by a run killed
      # between completing a representation and removing them go.
      gone = [k for k, e in entries.items() if e.complete and not (path / e.file).exists()]
      for key in gone:
        del entries[key]
      for key, entry in entries.items():
        if entry.complete:
          (path / f"{key.name}.done.npy").unlink(missing_ok=True)
    store = cls(path, metadata, entries, skipped, writable, lock_file)
    store._dirty = bool(gone)
    return store

  def check_metadata(self, metadata: Mapping) -> None:
    """Raises StoreError naming the differing fields unless `metadata` is this store's."""
    given = normalized(metadata)
    if given != self.metadata:
      raise StoreError(
          f"activation store {self.path} holds activations of another run; "
          f"{describe_difference(self.metadata, given)}. Use another output directory, "
          "or delete this one to start over")

  def refresh(self) -> "Store":
    """Re-reads the manifest (a reader polling a store that another process is writing)."""
    if self._lock_file is not None:
      return self  # the writer's view is the manifest
    fresh = self._read(self.path, False, None)
    self._entries, self._skipped = fresh._entries, fresh._skipped
    return self

  def close(self) -> None:
    """Releases the write lock (readers need not close)."""
    if self._lock_file is not None:
      self._lock_file.close()
      self._lock_file = None

  def __enter__(self) -> "Store":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- reading --------------------------------------------------------------------------------

  @property
  def ids(self) -> list:
    """Sentence ids: row i of every array belongs to sentence ids[i]."""
    return self.metadata["ids"]

  @property
  def n(self) -> int:
    return len(self.metadata["ids"])

  def keys(self, *, complete: bool = True) -> list[Key]:
    """Complete representations (or, complete=False, every one begun), sorted."""
    return sorted(k for k, e in self._entries.items() if e.complete or not complete)

  def __contains__(self, key) -> bool:
    return self.is_complete(key)

  def is_complete(self, key) -> bool:
    entry = self._entries.get(as_key(key))
    return entry is not None and entry.complete

  def shape(self, key) -> tuple[int, int]:
    return tuple(self._entry(key).shape)

  def skipped(self) -> dict[str, str]:
    """'{language}.{modality}' -> why it was not extracted (e.g. no speech for the language)."""
    return dict(self._skipped)

  def load(self, key, *, verify: bool = True, mmap_mode: str = "r") -> np.ndarray:
    """The [n, d] float32 array of a complete representation, memory-mapped read-only.

    verify: check the file's sha256 against the manifest (once per store object and file
    version). An incomplete or unknown representation, or a mismatch, raises StoreError.
    """
    entry = self._entry(key)
    if not entry.complete:
      raise StoreError(f"representation {entry.key.name} in {self.path} is not complete yet")
    file = self.path / entry.file
    redo = (f"delete {file} and run the extraction again into {self.path}: it recomputes this "
            "representation only")
    try:
      if verify:
        stat = file.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if self._verified.get(entry.key) != stamp:
          if file_sha256(file) != entry.sha256:
            raise StoreError(f"representation {entry.key.name}: {file} does not match its "
                             f"checksum in the manifest (modified, truncated or corrupt); {redo}")
          self._verified[entry.key] = stamp
      array = np.load(file, mmap_mode=mmap_mode)
    except StoreError:
      raise
    except FileNotFoundError:
      raise StoreError(f"representation {entry.key.name}: {file} is missing; run the extraction "
                       f"again into {self.path}: it recomputes this representation only") from None
    except (OSError, ValueError, EOFError) as e:
      raise StoreError(f"representation {entry.key.name}: cannot read {file} ({e}); "
                       f"{redo}") from None
    if array.dtype != DTYPE or array.shape != entry.shape:
      raise StoreError(f"representation {entry.key.name}: {file} holds {array.dtype} "
                       f"{array.shape}, manifest says {DTYPE.name} {entry.shape}; {redo}")
    return array

  def load_jax(self, key, *, verify: bool = True):
    """The representation as a jax.Array, sharing the mapped file's memory on CPU when it can."""
    return to_jax(self.load(key, verify=verify, mmap_mode="c"))

  def representations(self, keys: Iterable | None = None, *,
                      verify: bool = True) -> dict[Key, np.ndarray]:
    """{key: array} for the given (default: all complete) representations."""
    keys = self.keys() if keys is None else [as_key(k) for k in keys]
    return {k: self.load(k, verify=verify) for k in keys}

  def verify(self) -> list[Key]:
    """Complete representations whose file does not match its checksum (empty when all good)."""
    bad = []
    for key in self.keys():
      try:
        self.load(key, verify=True)
      except (StoreError, OSError, ValueError):
        bad.append(key)
    return bad

  def _entry(self, key) -> Entry:
    key = as_key(key)
    if key not in self._entries:
      raise StoreError(f"no representation {key.name} in activation store {self.path}")
    return self._entries[key]

  # -- writing --------------------------------------------------------------------------------

  def begin(self, key, dim: int) -> Writer:
    """A writer for a representation of width `dim`: resumes its rows if begun before.

    A representation already complete cannot be begun again (check `is_complete` first).
    """
    self._require_writable()
    key = as_key(key)
    entry = self._entries.get(key)
    if entry is not None and entry.complete:
      raise StoreError(f"representation {key.name} in {self.path} is already complete")
    shape = (self.n, int(dim))
    data_path = self.path / f"{key.name}.npy"
    done_path = self.path / f"{key.name}.done.npy"
    if entry is not None and tuple(entry.shape) != shape:
      raise StoreError(f"representation {key.name} in {self.path} was begun with width "
                       f"{entry.shape[1]}, now {dim}")
    if entry is not None and data_path.exists() and done_path.exists():
      try:
        data = open_memmap(data_path, mode="r+")
        done = open_memmap(done_path, mode="r+")
        if (data.shape == shape and data.dtype == DTYPE and done.shape == (self.n,)
            and done.dtype == TAG):
          writer = Writer(self, entry, data, done)
          writer.check_rows()  # rows damaged since they were written are recomputed
          return writer
      except (ValueError, OSError, EOFError):
        pass  # unreadable leftovers of a crash: start the representation over
    try:
      data = allocate(data_path, DTYPE, shape)
      done = allocate(done_path, TAG, (self.n,))
    except OSError as e:
      for p in (data_path, done_path):
        p.unlink(missing_ok=True)
      size = self.n * int(dim) * DTYPE.itemsize
      raise StoreError(f"cannot allocate {data_path} ({size / 2**20:.1f} MiB) for representation "
                       f"{key.name}: {reason(e)}. {RECOVER_WRITE}") from e
    entry = Entry(key, data_path.name, shape)
    self._entries[key] = entry
    self._dirty = True
    return Writer(self, entry, data, done)

  def sync(self) -> None:
    """Writes the manifest if representations were begun since it was last written.

    Until then a crash loses only those representations' progress (they start over), so
    writers are begun in bulk and synced once, not one manifest write each.
    """
    if self._dirty:
      self._write_manifest()

  def finish(self, writers: Iterable[Writer]) -> list[Key]:
    """Marks the full writers' representations complete (checksums, one manifest write).

    Writers with missing rows are left open and untouched. Returns the keys completed.
    """
    self._require_writable()
    completed = []
    for w in writers:
      if w._data is None or not w.full or w.check_rows().size:
        continue  # damaged rows were un-tagged: a later run recomputes them
      w.close()
      w.entry.sha256 = file_sha256(self.path / w.entry.file)
      w.entry.complete = True
      completed.append(w)
    if completed or self._dirty:
      self._write_manifest()
      for w in completed:
        (self.path / f"{w.key.name}.done.npy").unlink(missing_ok=True)
    return [w.key for w in completed]

  def mark_skipped(self, language: str, modality: str, reason: str) -> None:
    """Records why a (language, modality) has no representations."""
    self._require_writable()
    self._skipped[f"{language}.{modality}"] = reason
    self._write_manifest()

  def _require_writable(self) -> None:
    if not self.writable or self._lock_file is None:
      raise StoreError(f"activation store {self.path} is open read-only")

  def _write_manifest(self) -> None:
    manifest = {
        "format": FORMAT_VERSION,
        "metadata": self.metadata,
        "representations": {k.name: e.to_json() for k, e in sorted(self._entries.items())},
        "skipped": self._skipped,
    }
    manifest["checksum"] = manifest_checksum(manifest)
    write_json_atomic(self.path / MANIFEST, manifest)
    self._dirty = False


def to_jax(array: np.ndarray):
  """A numpy array as a jax.Array: zero-copy through DLPack on CPU where the buffer allows it
  (aligned and writable, e.g. a copy-on-write memmap), else one copy to the default device."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == "cpu" and array.flags.writeable and array.flags.c_contiguous:
    try:
      return jax.dlpack.from_dlpack(array)
    except (BufferError, TypeError, RuntimeError, ValueError):
      pass
  return jax.numpy.asarray(array)


def open_store(path: str | os.PathLike) -> Store:
  """A store opened for reading."""
  return Store.open(path, mode="r")
