"""Speech-only encoders: Whisper's encoder, the wav2vec2 family (wav2vec 2.0, XLS-R, MMS),
w2v-BERT 2.0 (engine/models/encoders.py runs them). Their site map has no text side."""
from __future__ import annotations

from engine.models import encoders

FAMILY = encoders.family_card("speech-encoders", "speech")


def load(model: str, **kwargs) -> encoders.EncoderAdapter:
  """'whisper-encoder-tiny', 'wav2vec2-tiny', 'w2v-bert-tiny' (random, offline) or e.g.
  'openai/whisper-small', 'facebook/mms-300m', 'facebook/w2v-bert-2.0'."""
  return encoders.load(FAMILY, model, **kwargs)
