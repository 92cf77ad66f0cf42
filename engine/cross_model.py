"""Comparison plans over several models' representations on the same sentences.

In a sweep over several models every site is named by its model (engine.keys.model_site:
'sonar-tiny/text_encoder'), so keys, chunks and the kernel tell the models apart with no other
field, and the site map and layer counts are the models' merged. The families of engine.pairs are
planned within each model, with that model's part of the site map; two families pair models:

  cross_model        same language and modality, model A (a) vs a later model B (b)
  cross_model_modal  same language, model A's text (a) vs another model B's speech (b)

Each pairs A's mapped sites of the modality (the site map's 'text' or 'speech' role; all of the
modality's sites where the map has none) with every such site of B, at every pair of layers
matched by relative depth (engine.pairs.align_layers).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from engine import pairs
from engine.keys import Key, as_keys, model_of, split_site

PLANS = ("cross_model", "cross_model_modal")


def models_of(keys: Iterable) -> list[str | None]:
  """The model slugs of the keys' sites, in first-use order ([None] for plain sites)."""
  return list(dict.fromkeys(model_of(Key(*k)) for k in keys))


def _roles(site_map: Mapping | None, role: str) -> list[str]:
  value = (site_map or {}).get(role)
  return [] if value is None else [value] if isinstance(value, str) else list(value)


def model_part(site_map: Mapping | None, layer_counts: Mapping[str, int] | None, slug: str
               ) -> tuple[dict | None, dict]:
  """One model's part of the merged site map and layer counts (sites still named by it)."""
  def mine(site):
    return split_site(site)[0] == slug
  part = None if site_map is None else {
      role: kept for role in site_map if (kept := [s for s in _roles(site_map, role) if mine(s)])}
  return part, {s: c for s, c in (layer_counts or {}).items() if mine(s)}


def _sites(keys: Sequence[Key], site_map, slug: str, modality: str) -> list[str]:
  own = list(dict.fromkeys(k.site for k in keys
                           if k.modality == modality and model_of(k) == slug))
  return [s for s in _roles(site_map, modality) if s in own] or own


def _layers(keys: Sequence[Key], modality: str, site: str) -> list[int]:
  return sorted({k.layer for k in keys if k.modality == modality and k.site == site})


def across(keys: Sequence[Key], modality_a: str, modality_b: str, family: str, *,
           both_ways: bool, site_map: Mapping | None = None, align: str = "relative",
           layer_counts: Mapping[str, int] | None = None) -> list[pairs.Pair]:
  """Same-language pairs of model A's `modality_a` sites and model B's `modality_b` sites at
  matched layers; A before B in model order, or (both_ways) every ordered pair of models."""
  counts = dict(layer_counts or {})
  models = models_of(keys)
  at = {(k.language, k.modality, k.site, k.layer): k for k in keys}
  languages = list(dict.fromkeys(k.language for k in keys))
  out = []
  for i, ma in enumerate(models):
    for mb in (models if both_ways else models[i + 1:]):
      if mb == ma:
        continue
      for sa in _sites(keys, site_map, ma, modality_a):
        for sb in _sites(keys, site_map, mb, modality_b):
          for la, lb in pairs.align_layers(_layers(keys, modality_a, sa),
                                           _layers(keys, modality_b, sb), align=align,
                                           count_a=counts.get(sa), count_b=counts.get(sb)):
            out += [(at[(lang, modality_a, sa, la)], at[(lang, modality_b, sb, lb)], family)
                    for lang in languages if (lang, modality_a, sa, la) in at
                    and (lang, modality_b, sb, lb) in at]
  return out


def _plan(name: str, keys, **options) -> list[pairs.Pair]:
  if name == "cross_model":
    return [p for m in ("text", "speech")
            for p in across(keys, m, m, "cross_model", both_ways=False, **options)]
  return across(keys, "text", "speech", "cross_model_modal", both_ways=True, **options)


def make_plan(name: str | Sequence[str], keys: Iterable, *, pivot: str | None = None,
              site_map: Mapping | None = None, align: str = "relative",
              layer_counts: Mapping[str, int] | None = None) -> list[pairs.Pair]:
  """engine.pairs.make_plan over one model's keys or several models': the plans of
  engine.pairs per model (in the order named, models in key order), PLANS across them."""
  names = name.split("+") if isinstance(name, str) else list(name)
  keys = as_keys(keys)
  models = models_of(keys)
  if len(models) < 2:
    if any(n in PLANS for n in names):
      raise ValueError(f"plan {'+'.join(names)!r} compares models, but the representations are "
                       "of one model")
    return pairs.make_plan(names, keys, pivot=pivot, site_map=site_map, align=align,
                           layer_counts=layer_counts)
  plan, seen = [], set()
  for n in names:
    if n in PLANS:
      found = _plan(n, keys, site_map=site_map, align=align, layer_counts=layer_counts)
    else:
      found = []
      for m in models:
        part_map, part_counts = model_part(site_map, layer_counts, m)
        found += pairs.make_plan(n, [k for k in keys if model_of(k) == m], pivot=pivot,
                                 site_map=part_map, align=align, layer_counts=part_counts)
    for a, b, family in found:
      if frozenset((a, b)) not in seen:
        seen.add(frozenset((a, b)))
        plan.append((a, b, family))
  return plan
