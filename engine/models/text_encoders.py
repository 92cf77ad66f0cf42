"""Text-only encoders: the NLLB / M2M100 encoder and XLM-R (engine/models/encoders.py runs
them). Their site map has no speech side."""
from __future__ import annotations

from engine.models import encoders

FAMILY = encoders.family_card("text-encoders", "text")


def load(model: str, **kwargs) -> encoders.EncoderAdapter:
  """'nllb-encoder-tiny', 'xlm-r-tiny' (random, offline) or e.g.
  'facebook/nllb-200-distilled-600M', 'FacebookAI/xlm-roberta-base'."""
  return encoders.load(FAMILY, model, **kwargs)
