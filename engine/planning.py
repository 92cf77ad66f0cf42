"""A sweep's plan from its representations: their order, the plan's parts, its digest, its
description. Plain values in (keys, plan name, site map, layer counts), engine.pairs underneath.

The site map is the model's declared site pairing as recorded in sweep.json at extraction, so
planning knows nothing about model families. A sweep over several models plans with their keys,
site maps and layer counts merged, each model's sites named by the model (engine.keys.model_site).
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, Sequence

from engine import cross_model, pairs
from engine.keys import Key, model_of
from engine.settings import PAPER_PLAN, SweepError


def ordered(keys: Iterable, languages: Sequence[str], modalities: Sequence[str],
            sites: Sequence[str]) -> list[Key]:
  """Keys by language (as requested), modality, site (as the model lists them), layer: the plan,
  and so the table and the figures, follow the requested language order."""
  site_order = list(dict.fromkeys(sites))

  def rank(k):
    return (languages.index(k.language), modalities.index(k.modality),
            site_order.index(k.site) if k.site in site_order else len(site_order), k.site, k.layer)

  return sorted((Key(*k) for k in keys), key=rank)


def plan_names(plan: str, keys: Sequence[Key], site_map: Mapping) -> list[str]:
  """The plan's parts: 'paper' is the families the paper reports, as far as the keys allow
  (those of one model; planning several models adds 'cross_model')."""
  if plan != PAPER_PLAN:
    return plan.split("+")
  modalities = {k.modality for k in keys}
  names = []
  if {"text", "speech"} <= modalities and site_map.get("text") and site_map.get("speech"):
    names.append("cross_modal")
  names += [f"cross_lingual_{m}" for m in ("text", "speech") if m in modalities]
  if site_map.get("pre_adaptor") and site_map.get("post_adaptor"):
    names.append("adaptor")
  return names


def make(plan: str, keys: Sequence[Key], *, site_map: Mapping, layer_counts: Mapping[str, int],
         pivot: str | None = None) -> list[pairs.Pair]:
  """The pairs of plan `plan` (PAPER_PLAN or engine.pairs plans) over `keys`; a SweepError
  naming --plan when there are none."""
  if not keys:
    raise SweepError("nothing to compare: the sweep has no representations")
  try:
    site_map = pairs.restrict_site_map(site_map, keys)
    models = cross_model.models_of(keys)
    if plan == PAPER_PLAN and len(models) > 1:  # each model's paper families, then across
      out = []
      for m in models:
        mine = [k for k in keys if model_of(k) == m]
        part_map, part_counts = cross_model.model_part(site_map, layer_counts, m)
        out += pairs.make_plan(plan_names(plan, mine, part_map), mine, pivot=pivot,
                               site_map=part_map, layer_counts=part_counts)
      out += cross_model.make_plan("cross_model", keys, site_map=site_map,
                                   layer_counts=layer_counts)
    else:
      out = cross_model.make_plan(plan_names(plan, keys, site_map), keys, pivot=pivot,
                                  site_map=site_map, layer_counts=layer_counts)
  except ValueError as e:
    raise SweepError(f"--plan={plan}: {e}") from None
  if not out:
    raise SweepError(f"--plan={plan} has no pairs among the {len(keys)} representations "
                     "(more languages or both modalities needed?)")
  return out


def digest(plan: Sequence[pairs.Pair]) -> str:
  """Names a plan, so checkpoints of another plan are never restored into this one."""
  h = hashlib.sha256()
  for a, b, family in plan:
    h.update(f"{a.name}|{b.name}|{family}\n".encode())
  return h.hexdigest()


def describe(plan: Sequence[pairs.Pair], what: str, *, chunk_pairs: int | None,
             heading: str = "plan", devices: str | None = None, done: int = 0) -> str:
  """The plan in a few lines: what is swept, representations, pairs per family, chunks."""
  chunks = pairs.chunk_plan(plan, max_pairs=chunk_pairs)
  lines = [f"{heading}: {what}",
           f"  {len(pairs.plan_keys(plan))} representations, {len(plan)} pairs in "
           f"{len(chunks)} chunks" + (f" on {devices}" if devices else "")
           + (f"; {done} pairs already scored" if done else "")]
  for family, count in pairs.family_counts(plan).items():
    lines.append(f"    {family:<22}{count:>8}")
  return "\n".join(lines)
