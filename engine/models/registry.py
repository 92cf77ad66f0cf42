"""Which adapter module a model name belongs to: the one place a model name is interpreted.

Each adapter module declares a `FAMILY` card (engine.models.base.Family) and a
`load(model, device, dtype, **options)` factory; adding a model family is one such module and
one line in `MODULES`. A name belongs to the first family whose name it contains ('seamless-tiny',
'facebook/seamless-m4t-v2-large'); a local directory also by its config.json `model_type`.
"""
from __future__ import annotations

import importlib
import json
import os

from engine.models.base import Adapter, Family

MODULES = ("engine.models.seamless", "engine.models.sonar", "engine.models.salmonn")


def families() -> dict[str, Family]:
  """{module: card} of every registered adapter module (imports them: torch, no weights)."""
  return {m: importlib.import_module(m).FAMILY for m in MODULES}


def _model_type(model: str) -> str | None:
  path = os.path.join(model, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f).get("model_type")
  except (OSError, ValueError, AttributeError):
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
