"""Extraction's inputs: the corpus read once into an index, and every check made on it before
any model runs.

Apart from `engine.extract` (the loop through the model) because a long run must stop at once
on a bad sentence, naming its id and language: empty text, text too long to run in one piece,
a language the tokenizer lacks, two languages with the same text (one mislabelled), audio at
another sampling rate, zero-length, too short, too long, non-finite, silent or wrongly scaled
audio (clipped audio is used, with a warning). Speech of a language whose audio is missing
(None) is recorded as skipped. Audio is only ever read in bounded chunks.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Iterable, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.data.corpus import SAMPLING_RATE, corpus_info
from engine.keys import MODALITIES
from engine.models.base import Adapter

MIN_SPEECH_SECONDS = 0.05  # shorter clips hold no speech (and no model frame)
SILENCE_PEAK = 1e-4  # peak |amplitude| below this (-80 dBFS) counts as silence
# A sentence goes through the model in one piece (pooling needs all of it), so its memory grows
# with its length, squared in attention. Longer inputs are refused, not cut: FLoRes sentences
# are a few hundred characters, FLEURS clips under 30 s.
MAX_TEXT_CHARS = 4096
MAX_CLIP_SECONDS = 120.0
MAX_PEAK = 2.0  # float audio lies in [-1, 1]; far above it is unscaled integer PCM
CLIPPED_FRACTION = 0.005  # this share of samples at the peak (>= 0.99) means clipping
_SCAN_ROWS = 64  # audio rows read at once while validating


@dataclasses.dataclass(frozen=True)
class Language:
  """One language's block of the corpus: corpus row indices in store-row order."""
  code: str
  rows: np.ndarray  # corpus index of store row r


def check_modalities(modalities: Sequence[str]) -> list[str]:
  """The requested modalities, in order, once each (a single name is one modality)."""
  if isinstance(modalities, str):
    modalities = [modalities]
  modalities = list(dict.fromkeys(modalities))
  bad = [m for m in modalities if m not in MODALITIES]
  if bad or not modalities:
    raise ValueError(f"unknown modalities {bad or modalities}; choose from {MODALITIES}")
  return modalities


def check_columns(corpus: datasets.Dataset, modalities: Sequence[str]) -> None:
  """The corpus is non-empty and has the columns the modalities read."""
  need = ["id", "language", "text"] + (["audio", "sampling_rate"] if "speech" in modalities else [])
  missing = [c for c in need if c not in corpus.column_names]
  if missing:
    raise ValueError(f"corpus lacks columns {missing} (has {corpus.column_names})")
  if len(corpus) == 0:
    raise ValueError("corpus is empty")


@dataclasses.dataclass(frozen=True)
class Index:
  """Per corpus row, read once in chunks (audio never materialised): what batching and
  validation need."""
  ids: np.ndarray
  languages: np.ndarray
  texts: list[str]
  source: str | None  # corpus_info(corpus)['source']: 'bundled', 'fleurs', or None
  rates: np.ndarray | None
  text_lengths: np.ndarray  # characters after trimming whitespace (0: empty or None)
  audio_lengths: np.ndarray | None  # samples (0 where None)
  audio_null: np.ndarray | None


def index_corpus(corpus: datasets.Dataset, with_audio: bool) -> Index:
  """The corpus's Index; with_audio also scans audio lengths and gaps, _SCAN_ROWS at a time."""
  small = corpus.select_columns(["id", "language", "text"]
                                + (["sampling_rate"] if with_audio else [])).to_pandas()
  texts = pa.array(small["text"], type=pa.string())
  text_lengths = pc.fill_null(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0).to_numpy()
  lengths = null = rates = None
  if with_audio:
    audio = corpus.select_columns(["audio"]).with_format("arrow")
    lengths, null = [], []
    for start in range(0, len(corpus), _SCAN_ROWS):  # zero-copy slices of a memory-mapped
      part = audio[start:start + _SCAN_ROWS]["audio"]  # corpus; bounded copies otherwise
      lengths.append(pc.fill_null(pc.list_value_length(part), 0).to_numpy())
      null.append(part.is_null().to_numpy())
    lengths, null = np.concatenate(lengths), np.concatenate(null)
    rates = small["sampling_rate"].to_numpy()
  source = corpus_info(corpus).get("source")
  return Index(small["id"].to_numpy(), small["language"].to_numpy(),
                [t or "" for t in small["text"].tolist()], source, rates,
                np.asarray(text_lengths, dtype=np.int64), lengths, null)


def language_blocks(index: Index) -> tuple[list[Language], list[int]]:
  """Languages in order of appearance; every language must hold the same sentence ids."""
  codes = list(dict.fromkeys(index.languages.tolist()))
  blocks, ids = [], None
  for code in codes:
    rows = np.flatnonzero(index.languages == code)
    these = index.ids[rows]
    order = np.argsort(these, kind="stable")
    rows, these = rows[order], these[order]
    if np.unique(these).size != these.size:
      dup = these[np.flatnonzero(np.diff(these) == 0)[0]]
      raise ValueError(f"sentence id {int(dup)} appears twice in language {code!r}")
    if ids is None:
      ids = these
    elif not np.array_equal(these, ids):
      diff = sorted(set(ids.tolist()) ^ set(these.tolist()))
      raise ValueError(f"language {code!r} does not hold the same sentence ids as {codes[0]!r} "
                       f"(differing ids: {diff[:10]})")
    blocks.append(Language(code, rows))
  return blocks, [int(i) for i in ids]


def check_distinct_languages(index: Index, blocks: list[Language]) -> None:
  """Two languages with the same text for every sentence: one of them is mislabelled."""
  seen: dict[int, str] = {}
  for block in blocks:
    texts = tuple(index.texts[i] for i in block.rows)
    digest = hash(texts)
    if digest in seen:
      other = next(b for b in blocks if b.code == seen[digest])
      if tuple(index.texts[i] for i in other.rows) == texts:
        raise ValueError(f"languages {seen[digest]!r} and {block.code!r} have the same text for "
                         f"every sentence: one of them is mislabelled")
    seen[digest] = block.code


def check_text(adapter: Adapter, index: Index, blocks: list[Language],
                ids: list[int], max_chars: int | None) -> None:
  """Every language is one the tokenizer takes; every text is non-empty and short enough."""
  for block in blocks:
    if not adapter.supports_language(block.code, "text"):
      raise ValueError(f"language {block.code!r} is not supported for text by {adapter.name} "
                       f"(its tokenizer has no language token for it); first sentence id "
                       f"{ids[0]}")
    lengths = index.text_lengths[block.rows]
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
      raise ValueError(f"sentence id {ids[empty[0]]} (language {block.code!r}) has empty text"
                       + (f" ({empty.size - 1} more in this language)" if empty.size > 1 else ""))
    long = np.flatnonzero(lengths > max_chars) if max_chars is not None else []
    if len(long):
      r = long[0]
      raise ValueError(f"sentence id {ids[r]} (language {block.code!r}) has {lengths[r]} "
                       f"characters of text, more than max_text_chars={max_chars}; a sentence "
                       "runs through the model in one piece, with memory growing with its length "
                       "squared: split it, or raise max_text_chars")


def audio_arrays(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
  """An Arrow list<float> column -> float32 arrays (None where null), without Python floats."""
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
  # one writable copy per batch: adapters may hand the arrays to torch.from_numpy
  flat = np.array(pc.list_flatten(column).to_numpy(zero_copy_only=False), dtype=np.float32)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  valid = column.is_valid().to_numpy(zero_copy_only=False)
  return [flat[s:s + n] if ok else None for s, n, ok in zip(starts, lengths, valid)]


def read_audio(corpus: datasets.Dataset, indices: Iterable[int]) -> list[np.ndarray | None]:
  """The audio of these corpus rows as float32 arrays (None where missing)."""
  table = corpus.select_columns(["audio"]).with_format("arrow")[[int(i) for i in indices]]
  return audio_arrays(table["audio"])


def check_speech(adapter: Adapter, corpus: datasets.Dataset, index: Index,
                  blocks: list[Language], ids: list[int], skipped: dict[str, str],
                  max_seconds: float | None = MAX_CLIP_SECONDS) -> dict[str, bool]:
  """{language: speech usable}; a bad clip raises, missing speech is skipped (and reported)."""
  usable = {}
  unheard = [b.code for b in blocks if not adapter.supports_language(b.code, "speech")]
  if unheard:  # once, before any work, rather than one skip at a time
    warnings.warn(f"{adapter.name} takes no speech in {len(unheard)} of the {len(blocks)} "
                  f"languages ({', '.join(unheard)}): their speech is skipped")
  for block in blocks:
    key = f"{block.code}.speech"
    missing = [ids[r] for r in np.flatnonzero(index.audio_null[block.rows])]
    if block.code in unheard:
      skipped[key] = f"{adapter.name} takes no speech in this language"
    elif len(missing) == len(block.rows):
      skipped[key] = "the corpus has no audio for this language"
    elif missing:
      skipped[key] = f"the corpus lacks audio for sentence ids {missing[:20]}"
    if key in skipped:
      usable[block.code] = False
      continue
    for r, i in enumerate(block.rows):
      n, rate = int(index.audio_lengths[i]), int(index.rates[i])
      where = f"sentence id {ids[r]} (language {block.code!r})"
      if rate != index.rates[block.rows[0]]:
        raise ValueError(f"{where} has sampling rate {rate}, other sentences of the language "
                         f"{int(index.rates[block.rows[0]])}")
      if rate != SAMPLING_RATE:
        raise ValueError(f"{where} has audio at {rate} Hz; corpora carry {SAMPLING_RATE} Hz "
                         "speech (resample it, e.g. with engine.data.speech.resample)")
      if n == 0:
        raise ValueError(f"{where} has zero-length audio")
      if n < MIN_SPEECH_SECONDS * rate:
        raise ValueError(f"{where} has audio of {n} samples ({n / rate * 1000:.0f} ms), too short "
                         f"to hold speech (at least {MIN_SPEECH_SECONDS * 1000:.0f} ms)")
      if max_seconds is not None and n > max_seconds * rate:
        raise ValueError(f"{where} has {n / rate:.0f} s of audio, more than max_clip_seconds="
                         f"{max_seconds:g}; a clip runs through the model in one piece, with "
                         "memory growing with its length squared: split it, or raise "
                         "max_clip_seconds")
    clipped = []
    for start in range(0, len(block.rows), _SCAN_ROWS):
      chunk = block.rows[start:start + _SCAN_ROWS]
      for r, audio in enumerate(read_audio(corpus, chunk), start=start):
        where = f"sentence id {ids[r]} (language {block.code!r})"
        if not np.isfinite(audio).all():
          raise ValueError(f"{where} has audio with NaN or Inf samples")
        magnitude = np.abs(audio)
        peak = float(magnitude.max())
        if peak < SILENCE_PEAK:
          raise ValueError(f"{where} has silent audio (peak amplitude {peak:.1e})")
        if peak > MAX_PEAK:
          raise ValueError(f"{where} has audio peaking at {peak:.4g}; float samples lie in "
                           "[-1, 1] (integer PCM must be divided by its full scale, e.g. 32768)")
        if peak >= 0.99 and np.mean(magnitude >= peak * 0.999) >= CLIPPED_FRACTION:
          clipped.append(ids[r])
    if clipped:
      warnings.warn(f"{len(clipped)} clip(s) of language {block.code!r} are clipped (sentence ids "
                    f"{clipped[:10]}); their speech is used as it is", RuntimeWarning, stacklevel=3)
    usable[block.code] = True
  return usable
