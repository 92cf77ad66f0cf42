"""Extraction: a corpus through a model adapter, pooled per sentence, streamed into a store.

For every language of the corpus and every requested modality, sentences go through the model
in length-bucketed batches (engine.data.batching.length_buckets, so padding is small); each
selected (site, layer) is pooled over valid positions and written into the representation
(language, modality, site, layer) of the activation store as the batch finishes. A re-run
resumes: complete representations are skipped, and so are batches whose rows are all written.

Inputs are validated before any model runs, so a bad sentence stops a long run at once with
its id and language: empty text, text too long to run in one piece, a language the tokenizer
lacks, two languages with the same text (one mislabelled), audio at another sampling rate,
zero-length, too short, too long, non-finite, silent or wrongly scaled audio (clipped audio is
used, with a warning). Non-finite activations are caught per batch, before writing. Speech of
a language whose audio is missing (None) is skipped and recorded in the store.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from engine.data.batching import length_buckets
from engine.data.corpus import SAMPLING_RATE, corpus_info
from engine.models.base import MODALITIES, Adapter
from engine.models.pooling import POOLINGS, pool
from engine.store import Key, Store, Writer

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


@dataclasses.dataclass
class ExtractReport:
  """What one call did: representations completed, skipped work, and model throughput."""
  store: str
  completed: list[Key] = dataclasses.field(default_factory=list)
  already_complete: list[Key] = dataclasses.field(default_factory=list)
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)
  batches_run: int = 0
  batches_resumed: int = 0
  sentences: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(MODALITIES, 0))
  seconds: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(MODALITIES, 0.0))

  def throughput(self, modality: str) -> float:
    """Sentences per second through model and pooling (0 when nothing ran)."""
    s = self.seconds.get(modality, 0.0)
    return self.sentences.get(modality, 0) / s if s > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class _Language:
  """One language's block of the corpus: corpus row indices in store-row order."""
  code: str
  rows: np.ndarray  # corpus index of store row r


def extract(adapter: Adapter, corpus: datasets.Dataset, store: Store | str | Path, *,
            modalities: Sequence[str] = MODALITIES, sites: Sequence[str] | None = None,
            layers: Sequence[int] | None = None, pooling: str = "mean", batch_size: int = 16,
            max_speech_seconds: float | None = None,
            max_text_chars: int | None = MAX_TEXT_CHARS,
            max_clip_seconds: float | None = MAX_CLIP_SECONDS, progress: bool = True,
            on_complete: Callable[[Key], None] | None = None,
            on_batch: Callable[[str, str, int], None] | None = None) -> ExtractReport:
  """Extracts pooled activations of `corpus` into `store` (a Store, or a directory to open).

  modalities: 'text' and/or 'speech'. sites: site names (default: every site of the requested
  modalities). layers: layer indices applied to every selected site, negative ones counted from
  the end (-1 = last); indices a site does not have are left out for that site. pooling: one of
  engine.models.pooling.POOLINGS. batch_size: most sentences per batch; max_speech_seconds:
  also cap a speech batch's padded duration (bounds accelerator memory). max_text_chars and
  max_clip_seconds refuse single sentences longer than that (None: no limit). on_complete(key) runs
  as each representation completes (e.g. to compute its SVD basis at once); on_batch(language,
  modality, batch_index) after each batch is written.
  """
  modalities = _check_modalities(modalities)
  if pooling not in POOLINGS:
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  _check_columns(corpus, modalities)
  selection = select_sites(adapter, modalities, sites, layers)
  index = _index(corpus, with_audio="speech" in selection)
  blocks, ids = _language_blocks(index)
  _check_distinct_languages(index, blocks)
  if "text" in selection:
    _check_text(adapter, index, blocks, ids, max_text_chars)
  report = ExtractReport(store=str(getattr(store, "path", store)))
  speech_ok = {}
  if "speech" in selection:
    speech_ok = _check_speech(adapter, corpus, index, blocks, ids, report.skipped,
                              max_clip_seconds)
  metadata = store_metadata(adapter, index, blocks, ids, pooling)
  own_store = not isinstance(store, Store)
  if own_store:
    st = Store.open(store, metadata)
  else:
    st = store
    st.check_metadata(metadata)
  try:
    for reason_key, reason in report.skipped.items():
      if st.skipped().get(reason_key) != reason:
        st.mark_skipped(*reason_key.split("."), reason)
    groups = [(b, m) for b in blocks for m in selection
              if m == "text" or speech_ok.get(b.code, False)]
    total = len(ids) * len(groups)
    with _progress_bar(total, progress) as bar:
      for block, modality in groups:
        _extract_group(adapter, corpus, index, st, block, modality, selection[modality],
                       pooling, batch_size, max_speech_seconds, ids, report, bar, on_complete,
                       on_batch)
  finally:
    if own_store:
      st.close()
  return report


# ---------------------------------------------------------------------------------------------
# Selection and validation.


def _check_modalities(modalities: Sequence[str]) -> list[str]:
  if isinstance(modalities, str):
    modalities = [modalities]
  modalities = list(dict.fromkeys(modalities))
  bad = [m for m in modalities if m not in MODALITIES]
  if bad or not modalities:
    raise ValueError(f"unknown modalities {bad or modalities}; choose from {MODALITIES}")
  return modalities


def select_sites(adapter: Adapter, modalities: Sequence[str], sites: Sequence[str] | None,
                 layers: Sequence[int] | None) -> dict[str, list[tuple[str, int]]]:
  """{modality: [(site, layer), ...]} for the requested sites and layers (see `extract`)."""
  available = [s for s in adapter.sites() if s.modality in modalities]
  if sites is not None:
    names = {s.name for s in available}
    unknown = [name for name in sites if name not in names]
    if unknown:
      raise ValueError(f"unknown sites {unknown} for model {adapter.name} and modalities "
                       f"{list(modalities)}; available: {sorted(names)}")
    available = [s for s in available if s.name in set(sites)]
  selection: dict[str, list[tuple[str, int]]] = {}
  used: set[int] = set()
  for site in available:
    if layers is None:
      chosen = list(range(site.layers))
    else:
      chosen = []
      for layer in layers:
        index = layer + site.layers if layer < 0 else layer
        if 0 <= index < site.layers:
          chosen.append(index)
          used.add(layer)
    for index in dict.fromkeys(chosen):
      selection.setdefault(site.modality, []).append((site.name, index))
  if layers is not None:
    unused = [layer for layer in layers if layer not in used]
    if unused:
      raise ValueError(f"layers {unused} exist in none of the selected sites of {adapter.name} "
                       f"({', '.join(f'{s.name}: {s.layers} layers' for s in available)})")
  if not selection:
    raise ValueError(f"nothing to extract from {adapter.name}: no site of modalities "
                     f"{list(modalities)} is selected")
  return {m: selection[m] for m in modalities if m in selection}


def _check_columns(corpus: datasets.Dataset, modalities: Sequence[str]) -> None:
  need = ["id", "language", "text"] + (["audio", "sampling_rate"] if "speech" in modalities else [])
  missing = [c for c in need if c not in corpus.column_names]
  if missing:
    raise ValueError(f"corpus lacks columns {missing} (has {corpus.column_names})")
  if len(corpus) == 0:
    raise ValueError("corpus is empty")


@dataclasses.dataclass(frozen=True)
class _Index:
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


def _index(corpus: datasets.Dataset, with_audio: bool) -> _Index:
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
  return _Index(small["id"].to_numpy(), small["language"].to_numpy(),
                [t or "" for t in small["text"].tolist()], source, rates,
                np.asarray(text_lengths, dtype=np.int64), lengths, null)


def _language_blocks(index: _Index) -> tuple[list[_Language], list[int]]:
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
    blocks.append(_Language(code, rows))
  return blocks, [int(i) for i in ids]


def _check_distinct_languages(index: _Index, blocks: list[_Language]) -> None:
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


def _check_text(adapter: Adapter, index: _Index, blocks: list[_Language],
                ids: list[int], max_chars: int | None) -> None:
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


def _audio_arrays(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
  """An Arrow list<float> column -> float32 arrays (None where null), without Python floats."""
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
  # one writable copy per batch: adapters may hand the arrays to torch.from_numpy
  flat = np.array(pc.list_flatten(column).to_numpy(zero_copy_only=False), dtype=np.float32)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  valid = column.is_valid().to_numpy(zero_copy_only=False)
  return [flat[s:s + n] if ok else None for s, n, ok in zip(starts, lengths, valid)]


def _read_audio(corpus: datasets.Dataset, indices: Iterable[int]) -> list[np.ndarray | None]:
  table = corpus.select_columns(["audio"]).with_format("arrow")[[int(i) for i in indices]]
  return _audio_arrays(table["audio"])


def _check_speech(adapter: Adapter, corpus: datasets.Dataset, index: _Index,
                  blocks: list[_Language], ids: list[int], skipped: dict[str, str],
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
      for r, audio in enumerate(_read_audio(corpus, chunk), start=start):
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


# ---------------------------------------------------------------------------------------------
# Store metadata.


def corpus_digest(index: _Index) -> str:
  """sha256 of ids, languages and texts: which sentences a store's rows are. Audio is left
  out, so text and speech of one corpus may be extracted into one store in separate runs (the
  corpus source is recorded next to it)."""
  h = hashlib.sha256()
  h.update(np.ascontiguousarray(index.ids, dtype=np.int64).tobytes())
  h.update("\x00".join(index.languages.tolist()).encode("utf-8"))
  h.update("\x00".join(index.texts).encode("utf-8"))
  return h.hexdigest()


def store_metadata(adapter: Adapter, index: _Index, blocks: list[_Language], ids: list[int],
                   pooling: str) -> dict:
  """What a store's arrays depend on; a resumed run must match it exactly."""
  model = {k: v for k, v in adapter.describe().items() if k != "device"}
  return {"model": model, "pooling": pooling, "languages": [b.code for b in blocks],
          "ids": ids, "corpus": {"source": index.source, "sha256": corpus_digest(index)}}


# ---------------------------------------------------------------------------------------------
# The extraction loop.


class _NoBar:
  def update(self, n=1):
    pass

  def set_description(self, *_):
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


def _progress_bar(total: int, enabled: bool):
  if not enabled:
    return _NoBar()
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, unit="sent", dynamic_ncols=True)


def _batches(index: _Index, block: _Language, modality: str, batch_size: int,
             max_speech_seconds: float | None) -> list[np.ndarray]:
  """Store-row index arrays, longest first (deterministic, so a resumed run sees the same)."""
  if modality == "text":
    return length_buckets(index.text_lengths[block.rows], max_batch=batch_size)
  cap = None
  if max_speech_seconds is not None:
    cap = max(1, int(max_speech_seconds * int(index.rates[block.rows[0]])))
  return length_buckets(index.audio_lengths[block.rows], max_batch=batch_size, max_tokens=cap)


def _run(adapter: Adapter, corpus: datasets.Dataset, index: _Index, block: _Language,
         modality: str, rows: np.ndarray):
  indices = [int(i) for i in block.rows[rows]]
  if modality == "text":
    texts = corpus.select_columns(["text"]).with_format("arrow")[indices]["text"].to_pylist()
    return adapter.run_text(texts, block.code)
  return adapter.run_speech(_read_audio(corpus, indices), int(index.rates[indices[0]]),
                            block.code)


def _overflow_hint(adapter: Adapter) -> str:
  dtype = str(adapter.describe().get("dtype", ""))
  if dtype in ("float16", "bfloat16"):
    return f"; the model runs in {dtype}, which overflows easily: try float32"
  return ""


def _extract_group(adapter, corpus, index: _Index, store: Store, block: _Language, modality: str,
                   pairs: list[tuple[str, int]], pooling: str, batch_size: int,
                   max_speech_seconds, ids: list[int], report: ExtractReport, bar,
                   on_complete, on_batch) -> None:
  keys = [Key(block.code, modality, site, layer) for site, layer in pairs]
  todo = [k for k in keys if not store.is_complete(k)]
  report.already_complete += [k for k in keys if k not in todo]
  bar.set_description(f"{block.code} {modality}")
  if not todo:
    bar.update(len(ids))
    return
  begun = set(store.keys(complete=False))
  writers: dict[Key, Writer] = {k: store.begin(k, store.shape(k)[1]) for k in todo if k in begun}
  try:
    for b, rows in enumerate(_batches(index, block, modality, batch_size, max_speech_seconds)):
      if len(writers) == len(todo) and not any(w.pending(rows) for w in writers.values()):
        report.batches_resumed += 1
        bar.update(len(rows))
        continue
      start = time.perf_counter()
      try:
        with torch.inference_mode():
          captures = _run(adapter, corpus, index, block, modality, rows)
      except ValueError as e:
        raise ValueError(f"{modality} batch of language {block.code!r} (sentence ids "
                         f"{[ids[r] for r in rows]}): {e}") from None
      pooled = {}
      with torch.inference_mode():
        for key in todo:
          capture = captures.get((key.site, key.layer))
          if capture is None:
            raise ValueError(f"{adapter.name} returned no activations at site {key.site!r} "
                             f"layer {key.layer} for a {modality} batch")
          pooled[key] = pool(capture.hidden, capture.mask, pooling).cpu().numpy()
      del captures
      report.seconds[modality] += time.perf_counter() - start
      report.sentences[modality] += len(rows)
      report.batches_run += 1
      for key, values in pooled.items():
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if bad.size:
          raise ValueError(
              f"non-finite activations (NaN or Inf) for sentence id {ids[rows[bad[0]]]} "
              f"(language {block.code!r}, {modality}) at site {key.site!r} layer {key.layer} of "
              f"{adapter.name}" + (f", and {bad.size - 1} more in its batch" if bad.size > 1 else "")
              + _overflow_hint(adapter) + "; representations completed so far are kept in "
              f"{store.path}")
      for key, values in pooled.items():
        if key not in writers:
          writers[key] = store.begin(key, values.shape[1])
        if writers[key].pending(rows):
          writers[key].write(rows, values)
      store.sync()  # record representations begun by this batch (a no-op after the first)
      bar.update(len(rows))
      if on_batch is not None:
        on_batch(block.code, modality, b)
    completed = store.finish(writers.values())
  finally:
    for w in writers.values():
      w.close()
  report.completed += completed
  if on_complete is not None:
    for key in completed:
      on_complete(key)
