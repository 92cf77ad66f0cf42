"""The one record format both corpora share, so the engine never knows which source it reads.

A corpus is a `datasets.Dataset` with columns id (FLoRes / bundled sentence id), language
(canonical code), text, audio (16 kHz mono float32, or None where speech is unavailable) and
sampling_rate. Rows are language-major in the requested order, ids ascending within a language,
and the k-th row of every language has the same id. What happened while building it (sentences
surviving each step, languages without speech and why) travels with it: `corpus_info(ds)`.

Corpora are written through `Dataset.from_generator` into an Arrow file under
{cache root}/datasets, keyed by a fingerprint of everything that determines the content, so a
second load memory-maps the file instead of decoding or synthesising again.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import numpy as np

from engine.data import speech

SAMPLING_RATE = speech.SAMPLING_RATE
# Bump when the rows a loader writes for the same inputs change.
FORMAT_VERSION = 1

FEATURES = datasets.Features({
    "id": datasets.Value("int64"),
    "language": datasets.Value("string"),
    "text": datasets.Value("string"),
    "audio": datasets.List(datasets.Value("float32")),
    "sampling_rate": datasets.Value("int64"),
})
COLUMNS = tuple(FEATURES)


def fingerprint(*parts: Any) -> str:
  """A stable digest of JSON-able parts (sources, options, versions) naming a built corpus."""
  blob = json.dumps([FORMAT_VERSION, *parts], sort_keys=True, ensure_ascii=False, default=str)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:40]


def build(rows: Callable[..., Iterator[dict]], gen_kwargs: dict, *, key: str, info: dict,
          cache_dir: str | Path | None = None, writer_batch_size: int = 64) -> datasets.Dataset:
  """Writes the rows `rows(**gen_kwargs)` yields (dicts of COLUMNS) as a corpus, or reuses it.

  `gen_kwargs` must hold tuples, not lists (`datasets` reads lists as shards). An exception
  raised by `rows` surfaces as itself, not wrapped by `datasets`.
  """
  root = speech.cache_root(cache_dir) / "datasets"
  try:
    root.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=root).close()
  except OSError as e:
    fallback = Path(tempfile.mkdtemp(prefix="xmodal-corpus-"))
    warnings.warn(f"corpus cache {root} is not usable ({e}); writing this corpus to {fallback}")
    root = fallback
  ds = _from_generator(rows, gen_kwargs, key, root, writer_batch_size)
  ds.info.description = json.dumps(info, ensure_ascii=False)
  return ds


def _from_generator(rows, gen_kwargs, key, root, writer_batch_size) -> datasets.Dataset:
  try:
    return datasets.Dataset.from_generator(
        rows, features=FEATURES, cache_dir=str(root), gen_kwargs=gen_kwargs, fingerprint=key,
        writer_batch_size=writer_batch_size)
  except datasets.exceptions.DatasetGenerationError as e:
    if isinstance(e.__cause__, (ValueError, OSError)):
      raise e.__cause__ from None
    raise


def corpus_info(ds: datasets.Dataset) -> dict:
  """What the loader reported: source, languages, survivors per step, languages without speech."""
  try:
    return json.loads(ds.info.description or "{}")
  except json.JSONDecodeError:
    return {}


def row(sentence_id: int, language: str, text: str, audio: np.ndarray | None) -> dict:
  return {"id": int(sentence_id), "language": language, "text": text,
          "audio": None if audio is None else np.asarray(audio, np.float32),
          "sampling_rate": SAMPLING_RATE}


def check_alignment(ds: datasets.Dataset, languages: list[str]) -> None:
  """Asserts the corpus invariant: language-major blocks with identical id sequences."""
  frame = ds.select_columns(["id", "language"]).to_pandas()
  blocks = [frame["id"][frame["language"] == code].to_numpy() for code in languages]
  order = np.concatenate([[code] * len(b) for code, b in zip(languages, blocks)])
  if len(order) != len(frame) or not (frame["language"].to_numpy() == order).all():
    raise AssertionError("corpus rows are not language-major in the requested order")
  for code, block in zip(languages, blocks):
    if not np.array_equal(block, blocks[0]):
      raise AssertionError(f"sentence ids of {code!r} differ from those of {languages[0]!r}")
    if (np.diff(block) < 0).any():
      raise AssertionError(f"sentence ids of {code!r} are not ascending")


def first_sentences(ds: datasets.Dataset, n: int) -> datasets.Dataset:
  """Rows of the first n sentence ids (every language keeps the same ids): quick runs."""
  if n < 1:
    raise ValueError(f"--max_sentences must be >= 1, got {n}")
  ids = ds.select_columns(["id"]).to_pandas()["id"].to_numpy()
  keep = np.sort(np.unique(ids))[:n]
  return ds.select(np.flatnonzero(np.isin(ids, keep)))
