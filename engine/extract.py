"""Extraction: a corpus through a model adapter, pooled per sentence, streamed into a store.

For every language of the corpus and every requested modality, sentences go through the model
in length-bucketed batches (engine.data.batching.length_buckets, so padding is small); each
selected (site, layer) is pooled over valid positions and written into the representation
(language, modality, site, layer) of the activation store as the batch finishes. A re-run
resumes: complete representations are skipped, and so are batches whose rows are all written.

Inputs are validated before any model runs (engine.extract_inputs, whose thresholds are
re-exported here), so a bad sentence stops a long run at once with its id and language.
Non-finite activations are caught per batch, before writing. Speech of a language whose audio
is missing (None) is skipped and recorded in the store.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Callable, Sequence

import datasets
import numpy as np
import torch

from engine.data.batching import length_buckets
from engine.extract_inputs import (CLIPPED_FRACTION, MAX_CLIP_SECONDS, MAX_PEAK, MAX_TEXT_CHARS,
                                   MIN_SPEECH_SECONDS, SILENCE_PEAK, Index, Language,
                                   check_columns, check_distinct_languages, check_modalities,
                                   check_speech, check_text, index_corpus, language_blocks,
                                   read_audio)
from engine.keys import MODALITIES, Key
from engine.models.base import Adapter
from engine.models.pooling import POOLINGS, pool
from engine.store import Store, Writer

__all__ = ["CLIPPED_FRACTION", "MAX_CLIP_SECONDS", "MAX_PEAK", "MAX_TEXT_CHARS",
           "MIN_SPEECH_SECONDS", "SILENCE_PEAK", "ExtractReport", "corpus_digest", "extract",
           "select_sites", "store_metadata"]


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
  modalities = check_modalities(modalities)
  if pooling not in POOLINGS:
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  check_columns(corpus, modalities)
  selection = select_sites(adapter, modalities, sites, layers)
  index = index_corpus(corpus, with_audio="speech" in selection)
  blocks, ids = language_blocks(index)
  check_distinct_languages(index, blocks)
  if "text" in selection:
    check_text(adapter, index, blocks, ids, max_text_chars)
  report = ExtractReport(store=str(getattr(store, "path", store)))
  speech_ok = {}
  if "speech" in selection:
    speech_ok = check_speech(adapter, corpus, index, blocks, ids, report.skipped,
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
# Selection.


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


# ---------------------------------------------------------------------------------------------
# Store metadata.


def corpus_digest(index: Index) -> str:
  """sha256 of ids, languages and texts: which sentences a store's rows are. Audio is left
  out, so text and speech of one corpus may be extracted into one store in separate runs (the
  corpus source is recorded next to it)."""
  h = hashlib.sha256()
  h.update(np.ascontiguousarray(index.ids, dtype=np.int64).tobytes())
  h.update("\x00".join(index.languages.tolist()).encode("utf-8"))
  h.update("\x00".join(index.texts).encode("utf-8"))
  return h.hexdigest()


def store_metadata(adapter: Adapter, index: Index, blocks: list[Language], ids: list[int],
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


def _batches(index: Index, block: Language, modality: str, batch_size: int,
             max_speech_seconds: float | None) -> list[np.ndarray]:
  """Store-row index arrays, longest first (deterministic, so a resumed run sees the same)."""
  if modality == "text":
    return length_buckets(index.text_lengths[block.rows], max_batch=batch_size)
  cap = None
  if max_speech_seconds is not None:
    cap = max(1, int(max_speech_seconds * int(index.rates[block.rows[0]])))
  return length_buckets(index.audio_lengths[block.rows], max_batch=batch_size, max_tokens=cap)


def _run(adapter: Adapter, corpus: datasets.Dataset, index: Index, block: Language,
         modality: str, rows: np.ndarray):
  indices = [int(i) for i in block.rows[rows]]
  if modality == "text":
    texts = corpus.select_columns(["text"]).with_format("arrow")[indices]["text"].to_pylist()
    return adapter.run_text(texts, block.code)
  return adapter.run_speech(read_audio(corpus, indices), int(index.rates[indices[0]]),
                            block.code)


def _overflow_hint(adapter: Adapter) -> str:
  dtype = str(adapter.describe().get("dtype", ""))
  if dtype in ("float16", "bfloat16"):
    return f"; the model runs in {dtype}, which overflows easily: try float32"
  return ""


def _extract_group(adapter, corpus, index: Index, store: Store, block: Language, modality: str,
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
