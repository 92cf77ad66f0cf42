"""The adapter interface every model path implements.

An adapter turns a batch of sentences (text or speech) into activations at named *sites*
(e.g. the text encoder's layers, the speech encoder's layers, the length adaptor), each with
a validity mask, so pooling and storage never need to know the model.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Sequence

import numpy as np
import torch

MODALITIES = ("text", "speech")


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


class Adapter(abc.ABC):
  """A model seen as sites of activations for text and speech batches."""

  name: str = "adapter"

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

  def supports_language(self, language: str, modality: str) -> bool:
    """Whether the model can take this language (canonical code) in this modality."""
    del language, modality
    return True

  def describe(self) -> dict:
    """Plain data saved next to results: what model, which weights, which options."""
    return {"name": self.name}
