"""Comparison plans: which pairs of representations a sweep scores, as plain data.

A representation is named by a `RepKey` (language, modality, site, layer). A plan is a list of
`(a, b, family)` triples, in a deterministic order with no pair twice (as an unordered pair), so
a sweep can be chunked, checkpointed and resumed by position. The family says what the pair
measures, and analyses select rows by it:

  cross_modal          same language, text (a) vs speech (b)
  cross_lingual_text   two languages, both text, same site and layer
  cross_lingual_speech two languages, both speech, same site and layer
  cross_modal_lingual  two languages, text (a) vs speech (b)   (only in the 'all' plan)
  adaptor              same language, speech before (a) vs after (b) the length adaptor
  cross_layer          same language, modality and site, layer i (a) vs layer j > i (b)
  cross_site           same language and modality, two other sites (only in the 'all' plan)

Text and speech usually live at different sites (Seamless: 'text_encoder' vs 'speech_encoder'),
so comparing modalities needs a declared site pairing, the `site_map`:

  {'text': site or [sites], 'speech': site or [sites],
   'pre_adaptor': site, 'post_adaptor': site}

Layers of a text site and a speech site are matched by relative depth (layer / (layers - 1);
a one-layer site counts as an output, depth 1): every layer of the site with fewer layers is
matched to the nearest-depth layer of the other, so equal layer counts pair layer i with layer
i. `align='index'` instead pairs equal indices only.
"""
from __future__ import annotations

import collections
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from engine.models.base import MODALITIES, SITE_MAP_ROLES

PLANS = ("all", "cross_modal", "cross_lingual_text", "cross_lingual_speech", "adaptor",
         "cross_layer")
FAMILIES = ("cross_modal", "cross_lingual_text", "cross_lingual_speech", "cross_modal_lingual",
            "adaptor", "cross_layer", "cross_site")
ALIGN_RULES = ("relative", "index")


class RepKey(NamedTuple):
  """Names one representation. Equal to (and hashes like) any 4-tuple with the same fields."""
  language: str
  modality: str
  site: str
  layer: int

  @property
  def name(self) -> str:
    return f"{self.language}.{self.modality}.{self.site}.{self.layer}"


Pair = tuple[RepKey, RepKey, str]


class Chunk(NamedTuple):
  """A slice of a plan whose representations all sit at two (site, layer) places at most.

  group:      ((site, layer), (site, layer)) the places this chunk touches.
  keys:       the representations it needs, in first-use order.
  pairs:      [P, 2] int32 indices into `keys`.
  plan_index: [P] int64 positions of these pairs in the plan (to write results back).
  """
  group: tuple
  keys: list[RepKey]
  pairs: np.ndarray
  plan_index: np.ndarray


# ----------------------------------------------------------------------------- keys and sites


def as_keys(keys: Iterable) -> list[RepKey]:
  """RepKeys from 4-tuples (or store keys); checks modalities and that no key repeats."""
  out, seen = [], set()
  for key in keys:
    try:
      language, modality, site, layer = key
    except (TypeError, ValueError):
      raise ValueError(f"representation key {key!r} is not (language, modality, site, layer)")
    if modality not in MODALITIES:
      raise ValueError(f"representation key {tuple(key)!r}: modality {modality!r} is not one of "
                       f"{MODALITIES}")
    rep = RepKey(str(language), str(modality), str(site), int(layer))
    if rep in seen:
      raise ValueError(f"representation key {rep.name!r} is given twice")
    seen.add(rep)
    out.append(rep)
  if not out:
    raise ValueError("no representation keys given")
  return out


def restrict_site_map(site_map: Mapping, keys: Iterable) -> dict:
  """A site map keeping only the sites some representation has (roles left empty are dropped),
  so a sweep over a subset of sites can still use a model's declared map."""
  keys = as_keys(keys)
  out = {}
  for role in site_map:
    modality = "text" if role == "text" else "speech"
    kept = [s for s in _role_sites(site_map, role) if s in _sites_of(keys, modality)]
    if kept:
      out[role] = kept[0] if isinstance(site_map[role], str) else tuple(kept)
  return out


def default_site_map(model: str, keys: Iterable | None = None) -> dict:
  """Deprecated: the model family's declared map (`engine.models.site_map_of`), restricted
  to `keys` when given. Take the map from the adapter (`adapter.site_map`) instead."""
  from engine.models import site_map_of  # pylint: disable=import-outside-toplevel
  site_map = site_map_of(model)
  return site_map if keys is None else restrict_site_map(site_map, keys)


def _sites_of(keys: Sequence[RepKey], modality: str) -> list[str]:
  return list(dict.fromkeys(k.site for k in keys if k.modality == modality))


def _role_sites(site_map: Mapping | None, role: str) -> list[str] | None:
  if not site_map or site_map.get(role) is None:
    return None
  value = site_map[role]
  return [value] if isinstance(value, str) else list(value)


def _check_site_map(site_map: Mapping | None, keys: Sequence[RepKey]) -> None:
  if site_map is None:
    return
  unknown = sorted(set(site_map) - set(SITE_MAP_ROLES))
  if unknown:
    raise ValueError(f"site_map roles {unknown} are not among {SITE_MAP_ROLES}")
  modality_of = {"text": "text", "speech": "speech", "pre_adaptor": "speech",
                 "post_adaptor": "speech"}
  for role in site_map:
    for site in _role_sites(site_map, role) or ():
      present = _sites_of(keys, modality_of[role])
      if site not in present:
        raise ValueError(f"site_map[{role!r}] names site {site!r}, but no {modality_of[role]} "
                         f"representation has it (sites present: {present})")


def _layers(keys: Sequence[RepKey], modality: str, site: str) -> list[int]:
  return sorted({k.layer for k in keys if k.modality == modality and k.site == site})


def _depth(layer: int, count: int) -> float:
  return layer / (count - 1) if count > 1 else 1.0


def align_layers(layers_a: Sequence[int], layers_b: Sequence[int], *, align: str = "relative",
                 count_a: int | None = None, count_b: int | None = None) -> list[tuple[int, int]]:
  """Matched (layer_a, layer_b) of two sites, ordered by layer_a.

  'relative': each layer of the side with fewer layers goes to the nearest-depth layer of the
  other (ties to the shallower); depth = layer / (count - 1), count defaulting to the deepest
  layer present + 1. 'index': equal layer indices.
  """
  if align not in ALIGN_RULES:
    raise ValueError(f"unknown layer alignment {align!r}; use one of {ALIGN_RULES}")
  layers_a, layers_b = sorted(set(layers_a)), sorted(set(layers_b))
  if not layers_a or not layers_b:
    return []
  if align == "index":
    return [(la, la) for la in layers_a if la in set(layers_b)]
  count_a = count_a or layers_a[-1] + 1
  count_b = count_b or layers_b[-1] + 1
  swap = len(layers_b) < len(layers_a)
  short, long_ = (layers_b, layers_a) if swap else (layers_a, layers_b)
  c_short, c_long = (count_b, count_a) if swap else (count_a, count_b)
  depths = np.array([_depth(l, c_long) for l in long_])
  matched = []
  for l in short:
    other = long_[int(np.argmin(np.abs(depths - _depth(l, c_short))))]
    matched.append((other, l) if swap else (l, other))
  return sorted(matched)


# ----------------------------------------------------------------------------- families


def classify(a: RepKey, b: RepKey) -> str:
  """The family of a pair by its keys alone ('adaptor' is only ever assigned by the plan)."""
  if a.language == b.language:
    if a.modality != b.modality:
      return "cross_modal"
    return "cross_layer" if a.site == b.site else "cross_site"
  if a.modality != b.modality:
    return "cross_modal_lingual"
  return f"cross_lingual_{a.modality}"


def _oriented(a: RepKey, b: RepKey, order: Mapping[RepKey, int]) -> tuple[RepKey, RepKey]:
  """Text before speech; otherwise the order the keys were given in."""
  if a.modality != b.modality:
    return (a, b) if a.modality == "text" else (b, a)
  return (a, b) if order[a] <= order[b] else (b, a)


def _within(group: Sequence[RepKey], order, pivot: str | None) -> list[Pair]:
  out = []
  for i, a in enumerate(group):
    for b in group[i + 1:]:
      if pivot is not None and a.language != b.language and pivot not in (a.language, b.language):
        continue
      a_, b_ = _oriented(a, b, order)
      out.append((a_, b_, classify(a_, b_)))
  return out


# ----------------------------------------------------------------------------- plans


def _mapped_slots(keys, site_map, align, layer_counts):
  """(text site, speech site, text layer) -> keys at both ends of each aligned layer pair."""
  slots: dict[tuple, list[RepKey]] = {}
  by_place = collections.defaultdict(list)
  for k in keys:
    by_place[(k.modality, k.site, k.layer)].append(k)
  for ts in _role_sites(site_map, "text"):
    for ss in _role_sites(site_map, "speech"):
      for lt, ls in align_layers(_layers(keys, "text", ts), _layers(keys, "speech", ss),
                                 align=align, count_a=layer_counts.get(ts),
                                 count_b=layer_counts.get(ss)):
        slots[(ts, ss, lt, ls)] = by_place[("text", ts, lt)] + by_place[("speech", ss, ls)]
  return slots


def _plan_all(keys, order, *, pivot, site_map, align, layer_counts) -> list[Pair]:
  """Every pair within a layer: the mapped text/speech layer slots, then each (site, layer)."""
  groups: list[list[RepKey]] = []
  if _role_sites(site_map, "text") and _role_sites(site_map, "speech"):
    groups += list(_mapped_slots(keys, site_map, align, layer_counts).values())
  places: dict[tuple, list[RepKey]] = {}
  for k in keys:
    places.setdefault((k.site, k.layer), []).append(k)
  groups += list(places.values())
  out = []
  for group in groups:
    out += _within(group, order, pivot)
  return out


def _plan_cross_modal(keys, order, *, site_map, align, layer_counts, **_) -> list[Pair]:
  text_sites, speech_sites = _role_sites(site_map, "text"), _role_sites(site_map, "speech")
  if text_sites is None or speech_sites is None:
    shared = [s for s in _sites_of(keys, "text") if s in _sites_of(keys, "speech")]
    if not shared:
      raise ValueError(
          f"plan 'cross_modal' needs site_map={{'text': ..., 'speech': ...}}: text sites "
          f"{_sites_of(keys, 'text')} and speech sites {_sites_of(keys, 'speech')} share no name")
    site_map = {"text": shared, "speech": shared}
  out = []
  for slot, group in _mapped_slots(keys, site_map, align, layer_counts).items():
    if site_map["text"] == site_map["speech"] and slot[0] != slot[1]:
      continue  # default pairing of shared site names: each site with itself
    texts = {k.language: k for k in group if k.modality == "text"}
    for k in group:
      if k.modality == "speech" and k.language in texts:
        out.append((texts[k.language], k, "cross_modal"))
  return out


def _plan_cross_lingual(modality):
  def plan(keys, order, *, pivot, site_map, **_) -> list[Pair]:
    sites = _role_sites(site_map, modality) or _sites_of(keys, modality)
    groups = collections.defaultdict(list)
    for k in keys:
      if k.modality == modality and k.site in sites:
        groups[(k.site, k.layer)].append(k)
    out = []
    for group in groups.values():
      out += [p for p in _within(group, order, pivot) if p[0].language != p[1].language]
    return out
  return plan


def _plan_adaptor(keys, order, *, site_map, **_) -> list[Pair]:
  pre, post = _role_sites(site_map, "pre_adaptor"), _role_sites(site_map, "post_adaptor")
  if not pre or not post:
    raise ValueError("plan 'adaptor' needs site_map={'pre_adaptor': site, 'post_adaptor': site} "
                     f"naming speech sites (present: {_sites_of(keys, 'speech')})")
  by_language = collections.defaultdict(lambda: {"pre": [], "post": []})
  for k in keys:
    if k.modality == "speech" and k.site in pre:
      by_language[k.language]["pre"].append(k)
    elif k.modality == "speech" and k.site in post:
      by_language[k.language]["post"].append(k)
  return [(a, b, "adaptor") for sides in by_language.values()
          for a in sides["pre"] for b in sides["post"]]


def _plan_cross_layer(keys, order, **_) -> list[Pair]:
  groups = collections.defaultdict(list)
  for k in keys:
    groups[(k.language, k.modality, k.site)].append(k)
  out = []
  for group in groups.values():
    group = sorted(group, key=lambda k: k.layer)
    out += [(a, b, "cross_layer") for i, a in enumerate(group) for b in group[i + 1:]]
  return out


_PLANS = {"all": _plan_all, "cross_modal": _plan_cross_modal,
          "cross_lingual_text": _plan_cross_lingual("text"),
          "cross_lingual_speech": _plan_cross_lingual("speech"),
          "adaptor": _plan_adaptor, "cross_layer": _plan_cross_layer}


def make_plan(name: str | Sequence[str], keys: Iterable, *, pivot: str | None = None,
              site_map: Mapping | None = None, align: str = "relative",
              layer_counts: Mapping[str, int] | None = None) -> list[Pair]:
  """The pairs of plan `name` over representations `keys`, as (a, b, family) triples.

  name:         one of PLANS, a '+'-joined list ('cross_modal+adaptor') or a sequence; plans
                are concatenated in the order named and a pair already planned is skipped.
  pivot:        a language; cross-lingual pairs are then only those involving it. Same-language
                pairs are unaffected.
  site_map:     the declared site pairing (module docstring); needed for 'cross_modal' unless
                text and speech share site names, and for 'adaptor'. Restricts the cross-lingual
                plans to its sites of that modality.
  align:        'relative' (default) or 'index', how text and speech layers are matched.
  layer_counts: site -> number of layers the model has there (Site.layers), for relative depth
                when only some layers are in `keys`.
  """
  names = name.split("+") if isinstance(name, str) else list(name)
  unknown = [n for n in names if n not in _PLANS]
  if unknown or not names:
    raise ValueError(f"unknown comparison plan {name!r}; choose from {PLANS} (or join them "
                     "with '+')")
  if align not in ALIGN_RULES:
    raise ValueError(f"unknown layer alignment {align!r}; use one of {ALIGN_RULES}")
  keys = as_keys(keys)
  if pivot is not None and pivot not in {k.language for k in keys}:
    raise ValueError(f"pivot language {pivot!r} has no representation (languages: "
                     f"{sorted({k.language for k in keys})})")
  _check_site_map(site_map, keys)
  order = {k: i for i, k in enumerate(keys)}
  plan, seen = [], set()
  for n in names:
    for a, b, family in _PLANS[n](keys, order, pivot=pivot, site_map=site_map, align=align,
                                  layer_counts=dict(layer_counts or {})):
      pair = frozenset((a, b))
      if pair not in seen:
        seen.add(pair)
        plan.append((a, b, family))
  return plan


# ----------------------------------------------------------------------------- using a plan


def plan_keys(plan: Sequence[Pair]) -> list[RepKey]:
  """The representations a plan touches, in first-use order."""
  return list(dict.fromkeys(k for a, b, _ in plan for k in (a, b)))


def family_counts(plan: Sequence[Pair]) -> dict[str, int]:
  """How many pairs of each family, for printing a plan before work starts."""
  return dict(collections.Counter(family for _, _, family in plan))


def index_pairs(plan: Sequence[Pair], keys: Sequence) -> np.ndarray:
  """[P, 2] int32 positions of each pair's representations in `keys` (the kernel's input order)."""
  position = {RepKey(*k): i for i, k in enumerate(keys)}
  out = np.empty((len(plan), 2), np.int32)
  for p, (a, b, _) in enumerate(plan):
    for side, key in enumerate((a, b)):
      if key not in position:
        raise ValueError(f"representation {RepKey(*key).name!r} of pair {p} is not among the "
                         f"{len(position)} representations given")
      out[p, side] = position[key]
  return out


def _place(k: RepKey) -> tuple[str, int]:
  return (k.site, k.layer)


def chunk_plan(plan: Sequence[Pair], *, max_pairs: int | None = None) -> list[Chunk]:
  """Splits a plan into chunks by the (site, layer) places their representations sit at.

  A chunk touches at most two places (all languages and modalities there), so the bases held
  for one chunk stay bounded whatever the number of layers. Pairs within one place join the
  first two-place chunk that holds that place, so its bases serve both. Chunks come in the order
  their group first appears in the plan; `max_pairs` splits big groups further. Together the
  chunks cover every plan position exactly once.
  """
  if max_pairs is not None and max_pairs < 1:
    raise ValueError(f"max_pairs must be positive, got {max_pairs}")
  group_of = [tuple(sorted({_place(a), _place(b)})) for a, b, _ in plan]
  home: dict[tuple, tuple] = {}
  for group in group_of:
    for place in group if len(group) == 2 else ():
      home.setdefault(place, group)
  groups: dict[tuple, list[int]] = {}
  for p, group in enumerate(group_of):
    if len(group) == 1:
      group = home.get(group[0], group)
    groups.setdefault(group, []).append(p)
  chunks = []
  for group, positions in groups.items():
    step = max_pairs or len(positions)
    for start in range(0, len(positions), step):
      part = positions[start:start + step]
      sub = [plan[p] for p in part]
      keys = plan_keys(sub)
      chunks.append(Chunk(group, keys, index_pairs(sub, keys), np.asarray(part, np.int64)))
  return chunks


def plan_frame(plan: Sequence[Pair]):
  """The plan as the key columns of the results table (site_a, layer_a, language_a, ...)."""
  import pandas as pd
  rows = [{"site_a": a.site, "layer_a": a.layer, "language_a": a.language,
           "modality_a": a.modality, "site_b": b.site, "layer_b": b.layer,
           "language_b": b.language, "modality_b": b.modality, "family": family}
          for a, b, family in plan]
  columns = ["site_a", "layer_a", "language_a", "modality_a", "site_b", "layer_b",
             "language_b", "modality_b", "family"]
  return pd.DataFrame(rows, columns=columns)
