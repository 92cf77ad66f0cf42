"""The paper's layer-wise analyses, computed from the tidy results table alone (engine.table).

Everything here reads only the table a sweep writes (one row per scored pair), so figures and
summaries can be redone without touching activations. Scores are similarities (SVCCA, PWCCA,
CKA), so 1 - score is a distance. Every matrix keeps PWCCA's orientation (rows = side a, the
weighted side) instead of mirroring it. Where the table has a null, each analysis carries the
chance-corrected score (score - null_mean: 0 is what unrelated representations of these sizes
and kept ranks score) beside the raw one.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from engine.table import (ALPHA, CENTRAL_FAMILIES, RESOURCE_ORDER, corrected, has_null,
                          language_info, languages_of, resolve_sites)

_PRE, _POST = "pre_adaptor", "post_adaptor"

# ----------------------------------------------------------------------------- analyses



def similarity_by_layer(table: pd.DataFrame, *, sites: tuple[str, str] | None = None,
                        main_only: bool = False) -> pd.DataFrame:
  """Mean and spread of each central family's scores at each layer.

  One row per (model, metric, family, site_a, site_b, layer_a, layer_b): `layer` is layer_a
  (the text layer for cross-modal pairs), `mean`, `std` (population), `min`, `max` and
  `count` over the family's scores there: one per language for cross-modal, one per language
  pair for cross-lingual families. `null_mean` and `null_sd` are the means of the pairs' null
  mean and sd (where a single pair's chance score lies), `corrected_mean` and
  `corrected_std` those of score - null_mean, `above_null` the fraction of pairs with
  p < ALPHA (all NaN without a null). `main` marks the series at the main sites (or `sites`).
  """
  p = table.p_value.to_numpy(float)
  above = np.where(np.isnan(p), np.nan, (p < ALPHA).astype(float))
  rows = table.assign(corrected=corrected(table).to_numpy(), above=above)
  rows = rows[rows.family.isin(CENTRAL_FAMILIES)]
  keys = ["model", "metric", "family", "site_a", "site_b", "layer_a", "layer_b"]
  grouped = rows.groupby(keys, sort=False)
  g = grouped.score
  out = pd.concat([g.mean().rename("mean"), g.std(ddof=0).rename("std"),
                   g.min().rename("min"), g.max().rename("max"),
                   g.count().rename("count"), grouped.null_mean.mean(), grouped.null_sd.mean(),
                   grouped.corrected.mean().rename("corrected_mean"),
                   grouped.corrected.std(ddof=0).rename("corrected_std"),
                   grouped.above.mean().rename("above_null")],
                  axis=1).reset_index()
  out = out.rename(columns={"layer_a": "layer"})
  main = resolve_sites(table, sites)
  text_site = out.model.map(lambda m: main.get(m, (None, None))[0])
  speech_site = out.model.map(lambda m: main.get(m, (None, None))[1])
  out["main"] = ((out.family.isin(["cross_modal", "cross_modal_lingual"]) &
                  (out.site_a == text_site) & (out.site_b == speech_site)) |
                 ((out.family == "cross_lingual_text") & (out.site_a == text_site)) |
                 ((out.family == "cross_lingual_speech") & (out.site_a == speech_site)))
  if main_only:
    out = out[out.main]
  out["_f"] = out.family.map(CENTRAL_FAMILIES.index)
  out = out.sort_values(["model", "metric", "_f", "site_a", "site_b", "layer"], kind="stable")
  return out.drop(columns="_f").reset_index(drop=True)


def gaps_by_layer(table: pd.DataFrame, *, sites: tuple[str, str] | None = None) -> pd.DataFrame:
  """Modality gap and language gap at each layer of the main (or given) text/speech sites.

  For each cross-modal layer pair (text site, layer t) ~ (speech site, layer s):
    modality_gap        = 1 - mean over languages of the cross-modal score (same language,
                          text layer t vs speech layer s);
    language_gap_text   = 1 - mean over language pairs of cross_lingual_text at layer t;
    language_gap_speech = 1 - mean over language pairs of cross_lingual_speech at layer s;
    language_gap        = mean of the two modalities' language gaps (each weighted equally;
                          the one present when only one is);
    excess              = modality_gap - language_gap (> 0: modality separates more than
                          language does);
    excess_corrected    = the same difference on chance-corrected scores (score - null_mean;
                          NaN without a null): the null levels of the families cancel.
  """
  columns = ["model", "metric", "site_text", "layer", "site_speech", "layer_speech",
             "modality_gap", "language_gap_text", "language_gap_speech", "language_gap",
             "excess", "excess_corrected", "n_languages"]
  main = resolve_sites(table, sites)
  table = table.assign(corrected=corrected(table).to_numpy())
  rows = []
  for (model, metric), t in table.groupby(["model", "metric"], sort=False):
    text_site, speech_site = main[model]
    cm = t[(t.family == "cross_modal") & (t.site_a == text_site) & (t.site_b == speech_site)]
    cm = cm.groupby(["layer_a", "layer_b"]).agg(mean=("score", "mean"),
                                                corrected=("corrected", "mean"),
                                                count=("score", "count"))
    lt = t[(t.family == "cross_lingual_text") & (t.site_a == text_site)]
    lt = lt.groupby("layer_a")[["score", "corrected"]].mean()
    ls = t[(t.family == "cross_lingual_speech") & (t.site_a == speech_site)]
    ls = ls.groupby("layer_a")[["score", "corrected"]].mean()

    def language_gap(layer_t, layer_s, column):
      both = [f.loc[l, column] for f, l in ((lt, layer_t), (ls, layer_s)) if l in f.index]
      return 1.0 - float(np.mean(both)) if both else np.nan

    for (layer_t, layer_s), row in cm.iterrows():
      gap_t = 1.0 - lt.score.get(layer_t, np.nan)
      gap_s = 1.0 - ls.score.get(layer_s, np.nan)
      gap = language_gap(layer_t, layer_s, "score")
      gap_c = language_gap(layer_t, layer_s, "corrected")
      rows.append([model, metric, text_site, int(layer_t), speech_site, int(layer_s),
                   1.0 - row["mean"], gap_t, gap_s, gap, 1.0 - row["mean"] - gap,
                   (1.0 - row["corrected"]) - gap_c, int(row["count"])])
  return pd.DataFrame(rows, columns=columns)


def _adaptor_sites(table, pre_site, post_site):
  adaptor = table[table.family == "adaptor"]
  if pre_site is None:
    pre_site = adaptor.site_a.iloc[0] if len(adaptor) else _PRE
  if post_site is None:
    post_site = adaptor.site_b.iloc[0] if len(adaptor) else _POST
  return pre_site, post_site


def adaptor_effect(table: pd.DataFrame, *, languages: pd.DataFrame | None = None,
                   pre_site: str | None = None, post_site: str | None = None,
                   sites: tuple[str, str] | None = None) -> pd.DataFrame:
  """What the length adaptor does to text-speech similarity, per language.

  effect = cross-modal score of (text, speech after the adaptor) - cross-modal score of
  (text, speech before it), same language, same text layer: the deepest text layer of the
  main text site scored against both (for one-layer adaptor sites, the text encoder's output),
  and each adaptor site's deepest layer. effect_corrected subtracts the shift of the null
  (null_post - null_pre): the adaptor keeps a different number of directions, which moves the
  chance level by itself. The adaptor sites default to those of the 'adaptor' rows, else
  'pre_adaptor' / 'post_adaptor'. Rows carry the language's name and resource group
  (`languages`: the language table, see `language_info`) and are ordered high, medium, low,
  then as the sweep wrote them. Empty when the table lacks these pairs.
  """
  columns = ["model", "metric", "language", "name", "resource", "site_text", "layer_text",
             "pre_site", "post_site", "score_pre", "score_post", "effect", "null_pre",
             "null_post", "effect_corrected"]
  pre_site, post_site = _adaptor_sites(table, pre_site, post_site)
  adaptor = table[(table.family == "cross_modal") & table.site_b.isin([pre_site, post_site])]
  if adaptor.empty:
    return pd.DataFrame(columns=columns)
  main = resolve_sites(table, sites)
  rows = []
  for (model, metric), t in adaptor.groupby(["model", "metric"], sort=False):
    cm = t
    if main[model][0] is not None:
      cm = cm[cm.site_a == main[model][0]]
    if cm.empty:
      continue
    both = set(cm[cm.site_b == pre_site].layer_a) & set(cm[cm.site_b == post_site].layer_a)
    if not both:
      continue
    cm = cm[cm.layer_a == max(both)]
    for language, rows_l in cm.groupby("language_a", sort=False):
      score, null = {}, {}
      for site in (pre_site, post_site):
        at = rows_l[rows_l.site_b == site]
        row = at.loc[at.layer_b.idxmax()] if len(at) else None
        score[site] = row["score"] if row is not None else np.nan
        null[site] = row["null_mean"] if row is not None else np.nan
      effect = score[post_site] - score[pre_site]
      rows.append([model, metric, language, rows_l.site_a.iloc[0], int(max(both)),
                   pre_site, post_site, score[pre_site], score[post_site], effect,
                   null[pre_site], null[post_site],
                   effect - (null[post_site] - null[pre_site])])
  out = pd.DataFrame(rows, columns=[c for c in columns if c not in ("name", "resource")])
  info = language_info(languages, languages_of(table) if len(table) else [])
  out = out.merge(info, on="language", how="left")[columns]
  order = {code: i for i, code in enumerate(languages_of(table))} if len(table) else {}
  out["_r"] = out.resource.map(lambda r: RESOURCE_ORDER.index(r) if r in RESOURCE_ORDER else 9)
  out["_l"] = out.language.map(order)
  return out.sort_values(["model", "metric", "_r", "_l"]).drop(columns=["_r", "_l"]).reset_index(
      drop=True)


def adaptor_effect_by_resource(effect: pd.DataFrame) -> pd.DataFrame:
  """Mean, std (population) and count of the adaptor effect per resource group, raw and
  chance-corrected (`corrected_mean`, `corrected_std`)."""
  g = effect.groupby(["model", "metric", "resource"], sort=False)
  out = pd.concat([g.effect.mean().rename("mean"), g.effect.std(ddof=0).rename("std"),
                   g.effect.count().rename("count"),
                   g.effect_corrected.mean().rename("corrected_mean"),
                   g.effect_corrected.std(ddof=0).rename("corrected_std")],
                  axis=1).reset_index()
  out["_r"] = out.resource.map(lambda r: RESOURCE_ORDER.index(r) if r in RESOURCE_ORDER else 9)
  return out.sort_values(["model", "metric", "_r"]).drop(columns="_r").reset_index(drop=True)


class LanguageMatrix(NamedTuple):
  """A language x language matrix of one kind at one layer: rows side a, columns side b.

  kind: 'text' (cross-lingual text), 'speech' (cross-lingual speech) or 'text_vs_speech'
  (rows text, columns speech; the diagonal is the cross-modal score, the rest the
  cross_modal_lingual pairs). Same-modality diagonals are NaN (a representation against
  itself); missing pairs are NaN. SVCCA and CKA are symmetric, so a same-modality matrix is
  filled both ways; PWCCA is not, so it holds only the scored order (rows = side a, the
  weighted side) and the other triangle stays NaN. `frame` holds the chance-corrected score
  (score - null_mean) when `corrected`, else the raw score.
  """
  model: str
  metric: str
  kind: str
  site_a: str
  layer_a: int
  site_b: str
  layer_b: int
  frame: pd.DataFrame
  corrected: bool = False


def _matrix(rows: pd.DataFrame, langs: list[str], symmetric: bool,
            column: str = "score") -> pd.DataFrame:
  position = {code: i for i, code in enumerate(langs)}
  values = np.full((len(langs), len(langs)), np.nan)
  i = rows.language_a.map(position).to_numpy(int)
  j = rows.language_b.map(position).to_numpy(int)
  values[i, j] = rows[column].to_numpy(float)
  if symmetric:
    values[j, i] = rows[column].to_numpy(float)
  return pd.DataFrame(values, index=pd.Index(langs, name="a"), columns=pd.Index(langs, name="b"))


def language_matrices(table: pd.DataFrame, *, sites: tuple[str, str] | None = None,
                      chance_corrected: bool | None = None) -> list[LanguageMatrix]:
  """Language x language matrices at every layer of the main (or given) sites.

  'text' at each text layer, 'speech' at each speech layer, 'text_vs_speech' at each aligned
  cross-modal layer pair (from cross_modal and cross_modal_lingual rows). Languages in the
  order the sweep wrote them. chance_corrected: score - null_mean (default: when every row
  of the (model, metric) has a null), else raw scores.
  """
  main = resolve_sites(table, sites)
  langs = languages_of(table)
  out = []
  for (model, metric), t in table.groupby(["model", "metric"], sort=False):
    use = has_null(t) if chance_corrected is None else chance_corrected
    t = t.assign(value=(corrected(t) if use else t.score).to_numpy())
    symmetric = metric != "pwcca"
    text_site, speech_site = main[model]
    for kind, family, site in (("text", "cross_lingual_text", text_site),
                               ("speech", "cross_lingual_speech", speech_site)):
      rows = t[(t.family == family) & (t.site_a == site)]
      for layer, at in rows.groupby("layer_a"):
        out.append(LanguageMatrix(model, metric, kind, site, int(layer), site, int(layer),
                                  _matrix(at, langs, symmetric, "value"), use))
    rows = t[t.family.isin(["cross_modal", "cross_modal_lingual"]) &
             (t.site_a == text_site) & (t.site_b == speech_site)]
    for (layer_a, layer_b), at in rows.groupby(["layer_a", "layer_b"]):
      out.append(LanguageMatrix(model, metric, "text_vs_speech", text_site, int(layer_a),
                                speech_site, int(layer_b),
                                _matrix(at, langs, False, "value"), use))
  return out


