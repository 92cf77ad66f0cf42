"""The corpus a run asks for, from either source: one loader for cli.sweep and cli.extract."""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import datasets

from engine.data.bundled import load_bundled
from engine.data.corpus import first_sentences
from engine.data.fleurs import load_fleurs

SOURCES = ("bundled", "fleurs")


def load_corpus(source: str, languages: Sequence[str], *, with_audio: bool = True,
                split: str = "test", max_sentences: int | None = None,
                fleurs_dir: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None,
                among: Iterable[int] | None = None) -> datasets.Dataset:
  """The bundled corpus or FLEURS in `languages`, the first `max_sentences` sentence ids.

  with_audio: synthesise the bundled corpus' speech (FLEURS always has it). split, fleurs_dir,
  among: FLEURS only (engine.data.fleurs.load_fleurs).
  """
  if source not in SOURCES:
    raise ValueError(f"corpus source {source!r} is not one of {', '.join(SOURCES)}")
  datasets.disable_progress_bars()
  if source == "fleurs":
    return load_fleurs(list(languages), split=split, local_dir=fleurs_dir,
                       max_sentences=max_sentences, cache_dir=cache_dir, among=among)
  corpus = load_bundled(list(languages), with_audio=with_audio, cache_dir=cache_dir)
  return corpus if max_sentences is None else first_sentences(corpus, max_sentences)
