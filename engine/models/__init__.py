"""Model adapters by name: tiny random configs for tests and the offline default, or real weights."""
from __future__ import annotations

from engine.models.base import MODALITIES, Adapter, Capture, Site

# name -> (module, factory). Imported lazily: each pulls in its transformers classes.
_REGISTRY = {
    "seamless": ("engine.models.seamless", "load"),
    "sonar": ("engine.models.sonar", "load"),
    "salmonn": ("engine.models.salmonn", "load"),
}


def family_of(model: str) -> str:
  """'seamless-tiny', 'facebook/seamless-m4t-v2-large', a local dir ... -> adapter family."""
  low = model.lower()
  for family in _REGISTRY:
    if family in low:
      return family
  raise ValueError(
      f"cannot tell which model family {model!r} is; name one of {sorted(_REGISTRY)} "
      "(e.g. 'seamless-tiny', 'facebook/seamless-m4t-v2-large', 'sonar-tiny', 'salmonn-tiny')")


def get_adapter(model: str, **kwargs) -> Adapter:
  """Builds the adapter for a model name, hub id or local directory."""
  import importlib
  module, factory = _REGISTRY[family_of(model)]
  return getattr(importlib.import_module(module), factory)(model, **kwargs)


__all__ = ["MODALITIES", "Adapter", "Capture", "Site", "family_of", "get_adapter"]
