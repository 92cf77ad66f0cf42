"""The settings only the model code can check, and the adapter options as `load` keywords.

Kept apart from engine.settings because these import the model registry (and so torch):
engine.settings must stay torch-free, so that a refused output directory is reported at once.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from engine.settings import Model, SweepError, flag_fields, model_names, one_of


def check_model(model: Model) -> None:
  """What only the model code knows: that the name is of a family we have an adapter for, and
  the pooling. Imports torch, hence not part of `check`."""
  from engine.models import family  # pylint: disable=import-outside-toplevel
  from engine.models.pooling import POOLINGS  # pylint: disable=import-outside-toplevel
  names = model_names(model)
  cards = {}
  for name in names:
    try:
      cards[name] = family(name)
    except ValueError as e:
      raise SweepError(f"--model={model.name}: {e}" if len(names) > 1 else str(e)) from None
  kinds = ", ".join(dict.fromkeys(card.name for card in cards.values()))
  one_of("pooling", model.pooling, POOLINGS)
  for name, field, _ in _given_options(model):  # each option for the models that take it
    given, takers = f"--{name}={getattr(model, field.name)}", field.metadata["families"]
    taking = {m: card for m, card in cards.items() if card.name in takers}
    if not taking:
      raise SweepError(f"{given} applies to {' and '.join(takers)} models; --model={model.name} "
                       f"is {kinds}: drop --{name}")
    if field.metadata["weights"] and all(card.random_match(m) for m, card in taking.items()):
      raise SweepError(f"{given} locates real weights; --model={model.name} is a random "
                       f"config: drop --{name}")
  if model.salmonn_beats is not None and model.salmonn_without_beats:
    raise SweepError("--salmonn_beats and --salmonn_without_beats contradict each other; "
                     "give one")


def _given_options(model: Model) -> list[tuple[str, dataclasses.Field, Any]]:
  """The adapter options set away from their defaults."""
  return [(name, f, hint) for name, f, hint in flag_fields(Model)
          if f.metadata["families"] and getattr(model, f.name) != f.default]


def adapter_options(model: Model) -> dict[str, Any]:
  """The adapter options the model's family takes, as keywords of its `load` (every such
  option, at its default or not; `check_model` has refused those of other families)."""
  from engine.models import family_of  # pylint: disable=import-outside-toplevel
  name = family_of(model.name)
  return {f.metadata["kwarg"]: getattr(model, f.name) for _, f, _ in flag_fields(Model)
          if name in f.metadata["families"]}
