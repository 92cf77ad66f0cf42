"""FLEURS (google/fleurs) as an aligned parallel corpus, through `datasets`, without torchcodec.

Sources, per language:
  * the Hub's parquet export (revision refs/convert/parquet, files {config}/{split}/*.parquet);
  * a local copy in `local_dir`, either that parquet export tree ({config}/{split}/*.parquet)
    or the original layout: data/{config}/{split}.tsv with data/{config}/audio/{split}.tar.gz
    (or the archive extracted as data/{config}/audio/{split}/). The original layout names the
    validation split `dev`; either name is accepted. Its TSV has no header; the columns are
    id, file name, raw transcription, normalized transcription, words, num_samples, gender.

Audio is read undecoded (`Audio(decode=False)`), decoded with soundfile, averaged to mono and
resampled to 16 kHz. A recording that cannot be decoded (or is missing from its archive) is an
error naming the file and the language: silently skipping it would change which sentences
survive alignment.

Alignment: a sentence (FLoRes id) is kept when every requested language has it, with at least
`recordings_per_sentence` recordings; the recordings used are the first ones by file name, so the
choice is deterministic. Each language then holds the same ids in ascending order (each id
repeated `recordings_per_sentence` times). The sentences surviving each step are logged and
kept in corpus_info(ds)['steps']. Processes that each load some of the languages (a
multi-process sweep) align them as one load of all would: each finds `eligible_ids` of its
languages, and each loads its own with `among=` the ids every process found.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import datasets
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import soundfile as sf
from absl import logging

from engine.data import corpus
from engine.data import languages as languages_lib
from engine.data import speech

HUB_REPO = "google/fleurs"
HUB_REVISION = "refs/convert/parquet"
SPLITS = {"train": ("train", "train"), "validation": ("validation", "dev"),
          "dev": ("validation", "dev"), "test": ("test", "test")}
TSV_COLUMNS = ("id", "file", "raw_transcription", "transcription", "words", "num_samples",
               "gender")
TEXT_COLUMNS = ("raw_transcription", "transcription")


@dataclasses.dataclass
class Source:
  """One language's split: a table (id, file, text, ref) and how to fetch each ref's bytes."""
  language: str
  config: str
  kind: str  # parquet | tsv
  location: str
  table: pd.DataFrame
  token: str  # identifies the content, for the corpus fingerprint
  parquet: datasets.Dataset | None = None  # kind parquet: rows addressed by ref (row index)
  audio_dir: Path | None = None  # kind tsv: extracted audio, or None to read `archive`
  archive: Path | None = None

  def audio_bytes(self, refs: list) -> dict:
    """{ref: encoded audio bytes}; a ref missing from the source is an error naming it."""
    if self.kind == "parquet":
      return {ref: self.parquet[int(ref)]["audio"]["bytes"] for ref in refs}
    if self.audio_dir is not None:
      return {ref: self._read_file(self.audio_dir / ref) for ref in refs}
    return self._read_archive(set(refs))

  def _read_file(self, path: Path) -> bytes:
    if not path.exists():
      raise ValueError(f"FLEURS audio file {str(path)!r} of language {self.language!r} is missing")
    return path.read_bytes()

  def _read_archive(self, wanted: set) -> dict:
    found = {}
    with tarfile.open(self.archive, "r|gz") as tar:
      for member in tar:
        name = os.path.basename(member.name)
        if member.isfile() and name in wanted and name not in found:
          found[name] = tar.extractfile(member).read()
    missing = sorted(wanted - set(found))
    if missing:
      raise ValueError(f"FLEURS audio file {missing[0]!r} of language {self.language!r} is not in "
                       f"{self.archive} ({len(missing)} files missing)")
    return found


def _split_names(split: str) -> tuple[str, str]:
  if split not in SPLITS:
    raise ValueError(f"unknown FLEURS split {split!r}; valid: {', '.join(SPLITS)}")
  return SPLITS[split]


def _parquet_source(code, config, ds, location, text_column) -> Source:
  ds = ds.cast_column("audio", datasets.Audio(decode=False))
  files = pc.struct_field(ds.data.column("audio"), "path").to_pylist()
  if "path" in ds.column_names:
    files = [f or p for f, p in zip(files, ds["path"])]
  if text_column not in ds.column_names:
    raise ValueError(f"FLEURS parquet of {code!r} ({location}) has no column {text_column!r}")
  table = pd.DataFrame({
      "id": np.asarray(ds["id"], np.int64),
      "file": [os.path.basename(f or f"row{i}") for i, f in enumerate(files)],
      "text": ds[text_column], "ref": np.arange(len(ds))})
  return Source(code, config, "parquet", location, table, ds._fingerprint, parquet=ds)


def _read_tsv(path: Path, code: str, text_column: str) -> pd.DataFrame:
  rows = []
  with open(path, encoding="utf-8", newline="") as f:
    for lineno, fields in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
      if not fields:
        continue
      if len(fields) < 4:
        raise ValueError(f"{path}:{lineno}: FLEURS row of {code!r} has {len(fields)} columns, "
                         f"expected {len(TSV_COLUMNS)}")
      record = dict(zip(TSV_COLUMNS, fields))
      try:
        sentence_id = int(record["id"])
      except ValueError:
        raise ValueError(f"{path}:{lineno}: sentence id {record['id']!r} of {code!r} is not an "
                         "integer") from None
      rows.append((sentence_id, record["file"], record[text_column], record["file"]))
  return pd.DataFrame(rows, columns=["id", "file", "text", "ref"])


def _local_source(code, config, local_dir, split, text_column, hf_cache_dir) -> Source:
  parquet_split, raw_split = _split_names(split)
  parquet = sorted((local_dir / config / parquet_split).glob("*.parquet"))
  if parquet:
    ds = datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split="train",
                               cache_dir=hf_cache_dir)
    return _parquet_source(code, config, ds, str(local_dir / config / parquet_split), text_column)
  for base in (local_dir / "data" / config, local_dir / config):
    tsv = base / f"{raw_split}.tsv"
    if tsv.exists():
      break
  else:
    raise ValueError(
        f"no local FLEURS data for language {code!r} (config {config!r}, split {split!r}) in "
        f"{local_dir}: expected {config}/{parquet_split}/*.parquet or "
        f"data/{config}/{raw_split}.tsv with data/{config}/audio/{raw_split}.tar.gz")
  audio_dir = base / "audio" / raw_split
  archive = base / "audio" / f"{raw_split}.tar.gz"
  if not audio_dir.is_dir() and not archive.exists():
    raise ValueError(f"no audio for FLEURS language {code!r}: expected {archive} or {audio_dir}/")
  audio = audio_dir if audio_dir.is_dir() else archive
  stat = audio.stat()
  token = hashlib.sha256(tsv.read_bytes()).hexdigest() + f":{audio}:{stat.st_size}:{stat.st_mtime_ns}"
  return Source(code, config, "tsv", str(tsv), _read_tsv(tsv, code, text_column), token,
                audio_dir=audio_dir if audio_dir.is_dir() else None,
                archive=None if audio_dir.is_dir() else archive)


def _hub_source(code, config, split, text_column, hf_cache_dir) -> Source:
  parquet_split, raw_split = _split_names(split)
  data_files = f"{config}/{parquet_split}/*.parquet"
  try:
    ds = datasets.load_dataset(HUB_REPO, revision=HUB_REVISION, data_files=data_files,
                               split="train", cache_dir=hf_cache_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise ConnectionError(
        f"could not load FLEURS language {code!r} ({HUB_REPO}, {data_files} at revision "
        f"{HUB_REVISION}): {type(e).__name__}: {e}. Without network access, provide a local "
        "copy: --fleurs_dir=DIR (cli.sweep, cli.extract) or load_fleurs(..., local_dir=DIR), "
        "where DIR holds the parquet export "
        f"({config}/{parquet_split}/*.parquet, e.g. from `hf download {HUB_REPO} --repo-type "
        f"dataset --revision {HUB_REVISION} --include '{config}/{parquet_split}/*' "
        f"--local-dir DIR`) or the original layout (data/{config}/{raw_split}.tsv and "
        f"data/{config}/audio/{raw_split}.tar.gz).") from e
  return _parquet_source(code, config, ds, f"hub:{HUB_REPO}@{HUB_REVISION}/{data_files}",
                         text_column)


def align(tables: dict[str, pd.DataFrame], recordings_per_sentence: int = 1,
          max_sentences: int | None = None, among: Iterable[int] | None = None
          ) -> tuple[dict[str, pd.DataFrame], list[dict]]:
  """Keeps sentences every language has (with enough recordings) and picks recordings by name.

  among: only these sentence ids are candidates (those that other languages, loaded elsewhere,
  have too). Returns per language the chosen rows sorted by (id, file), and the survivors of
  each step.
  """
  read = {"step": "read", "sentences": {}, "recordings": {}, "duplicate rows": {}}
  chosen = {}
  for code, table in tables.items():
    unique = table.drop_duplicates(subset=["id", "file"])
    chosen[code] = unique.sort_values(["id", "file"], kind="stable")
    read["sentences"][code] = int(unique["id"].nunique())
    read["recordings"][code] = int(len(unique))
    read["duplicate rows"][code] = int(len(table) - len(unique))
  steps = [read]
  ids = set.intersection(*(set(t["id"]) for t in chosen.values()))
  steps.append({"step": "in every language", "sentences": len(ids),
                "dropped": {c: int(t["id"].nunique() - len(ids)) for c, t in chosen.items()}})
  k = recordings_per_sentence
  counts = [t.groupby("id").size() for t in chosen.values()]
  ids = {i for i in ids if all(c[i] >= k for c in counts)}
  steps.append({"step": f"at least {k} recordings in every language", "sentences": len(ids)})
  if among is not None:
    ids &= {int(i) for i in among}
    steps.append({"step": "in the other processes' languages", "sentences": len(ids)})
  ids = sorted(ids)
  if max_sentences is not None:
    ids = ids[:max_sentences]
    steps.append({"step": f"first {max_sentences} by id", "sentences": len(ids)})
  keep = set(ids)
  for code, table in chosen.items():
    table = table[table["id"].isin(keep)]
    chosen[code] = table.groupby("id", sort=True).head(k).reset_index(drop=True)
  return chosen, steps


def decode(data: bytes, file: str, language: str) -> np.ndarray:
  """Encoded audio -> 16 kHz mono float32; undecodable audio is an error naming file and language."""
  try:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"FLEURS audio file {file!r} of language {language!r} cannot be decoded: "
                     f"{e}") from None
  if audio.shape[0] == 0:
    raise ValueError(f"FLEURS audio file {file!r} of language {language!r} is empty")
  return speech.resample(audio.mean(axis=1), rate, corpus.SAMPLING_RATE)


def _rows(plan) -> Iterator[dict]:
  for source, table in plan:
    data = source.audio_bytes(list(table["ref"]))
    for sentence_id, file, text, ref in table.itertuples(index=False):
      yield corpus.row(sentence_id, source.language, text, decode(data[ref], file, source.language))
    del data


def _sources(codes: list[str], split: str, local_dir, text_column: str,
             recordings_per_sentence: int, hf_cache_dir) -> dict[str, Source]:
  _split_names(split)
  if text_column not in TEXT_COLUMNS:
    raise ValueError(f"unknown text column {text_column!r}; valid: {', '.join(TEXT_COLUMNS)}")
  if recordings_per_sentence < 1:
    raise ValueError(f"recordings_per_sentence must be >= 1, got {recordings_per_sentence}")
  hf_cache = None if hf_cache_dir is None else str(hf_cache_dir)
  sources = {}
  for code in codes:
    config = languages_lib.get_language(code).fleurs
    sources[code] = (
        _local_source(code, config, Path(local_dir), split, text_column, hf_cache)
        if local_dir is not None else _hub_source(code, config, split, text_column, hf_cache))
  return sources


def eligible_ids(languages: str | Iterable[str], split: str = "test", *,
                 local_dir: str | os.PathLike | None = None, recordings_per_sentence: int = 1,
                 text_column: str = "raw_transcription",
                 hf_cache_dir: str | os.PathLike | None = None) -> list[int]:
  """The sentence ids `load_fleurs` would keep for these languages before `max_sentences`;
  their intersection over several groups of languages is what one load of all of them keeps."""
  codes = languages_lib.resolve_languages(languages)
  sources = _sources(codes, split, local_dir, text_column, recordings_per_sentence, hf_cache_dir)
  chosen, _ = align({c: s.table for c, s in sources.items()}, recordings_per_sentence)
  return sorted(int(i) for i in chosen[codes[0]]["id"].unique())


def load_fleurs(languages: str | Iterable[str] | None, split: str = "test", *,
                local_dir: str | os.PathLike | None = None, recordings_per_sentence: int = 1,
                max_sentences: int | None = None, text_column: str = "raw_transcription",
                cache_dir: str | os.PathLike | None = None,
                hf_cache_dir: str | os.PathLike | None = None,
                among: Iterable[int] | None = None) -> datasets.Dataset:
  """FLEURS sentences present in every language, as text and 16 kHz speech, aligned by id.

  languages: codes in any accepted spelling (None: DEFAULT_LANGUAGES). local_dir: a local copy
  (see module doc); without it the Hub's parquet export is read, and a network failure raises
  ConnectionError explaining how to provide a local copy. cache_dir: where the built corpus is
  written (engine.data.speech.cache_root); hf_cache_dir: `datasets`' own download/parquet cache.
  among: only these sentence ids are candidates (see `eligible_ids`).
  """
  codes = languages_lib.resolve_languages(languages)
  sources = _sources(codes, split, local_dir, text_column, recordings_per_sentence, hf_cache_dir)
  chosen, steps = align({c: s.table for c, s in sources.items()}, recordings_per_sentence,
                        max_sentences, among)
  for step in steps:
    logging.info("FLEURS %s: %s", split, step)
  if not len(chosen[codes[0]]):
    raise ValueError(f"no FLEURS sentence of split {split!r} survives alignment across "
                     f"{', '.join(codes)}: {steps}")
  info = {
      "source": "fleurs", "split": split, "languages": codes,
      "configs": {c: s.config for c, s in sources.items()},
      "locations": {c: s.location for c, s in sources.items()},
      "text_column": text_column, "recordings_per_sentence": recordings_per_sentence,
      "sentences": int(chosen[codes[0]]["id"].nunique()), "steps": steps,
      "sampling_rate": corpus.SAMPLING_RATE,
      "files": {c: list(t["file"]) for c, t in chosen.items()},
  }
  key = corpus.fingerprint("fleurs", split, codes, text_column,
                           [s.token for s in sources.values()],
                           {c: [list(map(str, r)) for r in t[["id", "file"]].itertuples(index=False)]
                            for c, t in chosen.items()})
  plan = tuple((sources[c], chosen[c]) for c in codes)
  return corpus.build(_rows, {"plan": plan}, key=key, info=info, cache_dir=cache_dir)
