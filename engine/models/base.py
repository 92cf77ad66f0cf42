"""The adapter interface every model path implements, and the family card each one declares.

An adapter turns a batch of sentences (text or speech) into activations at named *sites*
(e.g. the text encoder's layers, the speech encoder's layers, the length adaptor), each with
a validity mask, so pooling and storage never need to know the model. A family card says,
without loading anything, which model names a family claims and how its sites pair up.
No torch here: planning code reads modalities and site maps from this module.
"""
from __future__ import annotations

import abc
import dataclasses
import re
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
  import numpy as np
  import torch

MODALITIES = ("text", "speech")
SITE_MAP_ROLES = ("text", "speech", "pre_adaptor", "post_adaptor")


@dataclasses.dataclass(frozen=True)
class Site:
  """A place in the model whose activations we capture: `layers` tensors, indexed 0..layers-1."""
  name: str
  modality: str
  layers: int


@dataclasses.dataclass
class Capture:
  """Activations of one batch at one (site, layer): hidden [B, T, D], mask [B, T] (True = valid)."""
  hidden: torch.Tensor
  mask: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Family:
  """What a model family declares about itself, readable before any weights load.

  name:        the family ('seamless'); a model name containing it belongs to the family.
  random:      regex (searched in the lower-cased, stripped name) of its random offline configs.
  model_types: transformers `config.model_type`s of its checkpoints (claims local directories).
  site_map:    which text site meets which speech site, and the length adaptor's input and
               output sites: {'text': site(s), 'speech': site(s), 'pre_adaptor': site,
               'post_adaptor': site} (engine.pairs reads it). The speech side lists the
               adaptor's input and output too, so the cross-modal plan also scores the text
               side's last layer against speech before and after it (the adaptor analysis).
  """
  name: str
  random: str
  site_map: Mapping[str, object]
  model_types: tuple[str, ...] = ()

  def __post_init__(self):
    unknown = sorted(set(self.site_map) - set(SITE_MAP_ROLES))
    if unknown:
      raise ValueError(f"family {self.name!r}: site_map roles {unknown} are not {SITE_MAP_ROLES}")

  def claims(self, model: str) -> bool:
    """Whether a model name or hub id names this family (local directories: see registry)."""
    return self.name in model.lower()

  def random_match(self, model: str) -> re.Match | None:
    """The match of a random offline config name ('seamless-v1-mid'), None for real weights."""
    return re.search(self.random, model.strip().lower())


class Adapter(abc.ABC):
  """A model seen as sites of activations for text and speech batches."""

  name: str = "adapter"
  family: Family | None = None

  @abc.abstractmethod
  def sites(self) -> list[Site]:
    """Every site this model exposes, for both modalities."""

  @abc.abstractmethod
  def run_text(self, texts: Sequence[str], language: str) -> dict[tuple[str, int], Capture]:
    """Runs a text batch; keys are (site name, layer)."""

  @abc.abstractmethod
  def run_speech(self, audios: Sequence[np.ndarray], sampling_rate: int,
                 language: str) -> dict[tuple[str, int], Capture]:
    """Runs a speech batch (mono float waveforms); keys are (site name, layer)."""

  @property
  def site_map(self) -> dict:
    """The family's declared site pairing (a fresh dict: callers may restrict it)."""
    if self.family is None:
      raise ValueError(f"adapter {self.name!r} declares no family, so no site_map; pass one "
                       "explicitly, e.g. {'text': 'text_encoder', 'speech': 'speech_encoder'}")
    return dict(self.family.site_map)

  def supports_language(self, language: str, modality: str) -> bool:
    """Whether the model can take this language (canonical code) in this modality."""
    del language, modality
    return True

  def describe(self) -> dict:
    """Plain data saved next to results: what model, which weights, which options."""
    return {"name": self.name}
