"""Model adapters by name: tiny random configs for tests and the offline default, or real weights."""
from __future__ import annotations

from engine.models.base import MODALITIES, Adapter, Capture, Site

# name -> (module, factory). Imported lazily: each pulls in its transformers classes.
_REGISTRY = {
    "seamless": ("engine.models.seamless", "load"),
    "sonar": ("engine.models.sonar", "load"),
    "salmonn": ("engine.models.salmonn", "load"),
    "qwen2-audio": ("engine.models.qwen2_audio", "load"),
    "qwen2.5-omni": ("engine.models.qwen2_5_omni", "load"),
    "voxtral": ("engine.models.voxtral", "load"),
    "audioflamingo3": ("engine.models.audioflamingo3", "load"),
    "whisper-encoder": ("engine.models.encoders", "load"),
    "wav2vec2": ("engine.models.encoders", "load"),
    "w2v-bert": ("engine.models.encoders", "load"),
    "nllb-encoder": ("engine.models.encoders", "load"),
    "xlm-r": ("engine.models.encoders", "load"),
}
# config.model_type -> family, for hub ids and local directories whose name says nothing.
MODEL_TYPES = {
    "seamless_m4t": "seamless", "seamless_m4t_v2": "seamless", "qwen2_audio": "qwen2-audio",
    "qwen2_5_omni": "qwen2.5-omni", "qwen2_5_omni_thinker": "qwen2.5-omni",
    "voxtral": "voxtral", "audioflamingo3": "audioflamingo3", "whisper": "whisper-encoder",
    "wav2vec2": "wav2vec2", "wav2vec2-bert": "w2v-bert", "m2m_100": "nllb-encoder",
    "xlm-roberta": "xlm-r",
}


def family_of(model: str) -> str:
  """'seamless-tiny', 'facebook/seamless-m4t-v2-large', a local dir ... -> adapter family."""
  low = model.lower()
  for family in _REGISTRY:
    if family in low:
      return family
  model_type = _model_type(model)
  if model_type is not None:
    if model_type in MODEL_TYPES:
      return MODEL_TYPES[model_type]
    raise ValueError(f"model {model!r} has model type {model_type!r}, which no adapter takes; "
                     f"known model types: {sorted(MODEL_TYPES)}")
  raise ValueError(
      f"cannot tell which model family {model!r} is; name one of {sorted(_REGISTRY)} "
      "(e.g. 'seamless-tiny', 'facebook/seamless-m4t-v2-large', 'sonar-tiny', 'salmonn-tiny')")


def _model_type(model: str) -> str | None:
  """config.model_type of a local directory or (cached) hub id; None when there is no config."""
  from transformers import AutoConfig  # pylint: disable=import-outside-toplevel
  try:
    return AutoConfig.from_pretrained(model).model_type
  except (OSError, ValueError):
    return None


def get_adapter(model: str, **kwargs) -> Adapter:
  """Builds the adapter for a model name, hub id or local directory."""
  import importlib
  module, factory = _REGISTRY[family_of(model)]
  return getattr(importlib.import_module(module), factory)(model, **kwargs)


__all__ = ["MODALITIES", "Adapter", "Capture", "Site", "family_of", "get_adapter"]
