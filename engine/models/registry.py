"""Which adapter module a model name belongs to: the one place a model name is interpreted.

Each adapter module declares a `FAMILY` card (engine.models.base.Family) and a
`load(model, device, dtype, **options)` factory; adding a model family is one such module and
one line in `MODULES`. A name belongs to the first family that claims it (by default, whose name it
contains: 'seamless-tiny', 'facebook/seamless-m4t-v2-large'); otherwise, a local directory or hub
id belongs to the family that lists its config's `model_type` (the audio-language models and
encoders claim only their tiny names, so real weights always go by model type).
"""
from __future__ import annotations

import importlib
import json
import os

from engine.models.base import Adapter, Family

MODULES = ("engine.models.seamless", "engine.models.sonar", "engine.models.salmonn",
           "engine.models.qwen2_audio", "engine.models.voxtral", "engine.models.qwen2_5_omni",
           "engine.models.audioflamingo3", "engine.models.speech_encoders",
           "engine.models.text_encoders")


def families() -> dict[str, Family]:
  """{module: card} of every registered adapter module (imports them: torch, no weights)."""
  return {m: importlib.import_module(m).FAMILY for m in MODULES}


def _model_type(model: str) -> str | None:
  """config.json's model_type of a local directory, else of a hub id ('owner/name') through
  AutoConfig (the local cache, or the hub when online); None when there is no config."""
  path = os.path.join(model, "config.json")
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        return json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
      return None
  if os.path.exists(model) or model.count("/") != 1:
    return None
  try:
    from transformers import AutoConfig  # pylint: disable=import-outside-toplevel
    return AutoConfig.from_pretrained(model).model_type
  except Exception:  # pylint: disable=broad-except  # no such repo, offline, gated: not ours
    return None


def _module_of(model: str) -> str:
  cards = families()
  for module, card in cards.items():
    if card.claims(model):
      return module
  model_type = _model_type(model)
  for module, card in cards.items():
    if model_type is not None and model_type in card.model_types:
      return module
  if model_type is not None:
    known = sorted({t for card in cards.values() for t in card.model_types})
    raise ValueError(f"model {model!r} has model type {model_type!r}, which no adapter takes; "
                     f"known model types: {', '.join(known)}")
  names = sorted(card.name for card in cards.values())
  raise ValueError(
      f"cannot tell which model family {model!r} is; name one of {names} "
      "(e.g. 'seamless-tiny', 'facebook/seamless-m4t-v2-large', 'sonar-tiny', 'salmonn-tiny')")


def family(model: str) -> Family:
  """The card of the family a model name, hub id or local directory belongs to."""
  return importlib.import_module(_module_of(model)).FAMILY


def family_of(model: str) -> str:
  """'seamless-tiny', 'facebook/seamless-m4t-v2-large', a local dir ... -> adapter family."""
  return family(model).name


def site_map_of(model: str) -> dict:
  """The family's declared site pairing for a model name, without loading any weights."""
  return dict(family(model).site_map)


def get_adapter(model: str, **kwargs) -> Adapter:
  """Builds the adapter for a model name, hub id or local directory."""
  return importlib.import_module(_module_of(model)).load(model, **kwargs)
