"""The paper's analyses, computed from the tidy results table alone.

Everything here reads only the table a sweep writes (one row per scored pair), so figures and
summaries can be redone without touching activations. Columns (`COLUMNS`):

  model, model_a, model_b, site_a, layer_a, language_a, modality_a, site_b, layer_b,
  language_b, modality_b, family, metric, score, rank_a, rank_b, n, null_mean, null_sd, z,
  p_value, permutations

model_a and model_b are the models of the two sides; `model` is theirs when they are one model
(every row of a single-model sweep), else 'model_a~model_b' (families cross_model and
cross_model_modal of a sweep over several models).

`family` is the comparison family of engine.pairs (cross_modal, cross_lingual_text, ...). In a
cross-modal row side a is text and side b speech. Scores are similarities in [0, 1] (SVCCA,
PWCCA, CKA), so 1 - score is a distance. PWCCA is asymmetric: a row's score is weighted on
side a (the text side of a cross-modal pair, the language listed first otherwise), and every
matrix here keeps that orientation (rows = side a) instead of mirroring it.

The null columns (`NULL_COLUMNS`) come from the sweep's permutation null (engine.svcca.
calibrated): the mean and sd of the score over sentence permutations of one side, z and the
permutation p-value; `permutations` is how many (0: the null was off, and the four are NaN).
Tables written before the null existed read with NaN there. The *chance-corrected* score is
score - null_mean: 0 is what unrelated representations of these sizes and kept ranks score.
Findings are stated on it when the null is there, with the raw score alongside, and fall back
to raw scores, labelled "raw (no null)", when it is not.

The *main sites* of a model are the text and speech sites its layer-wise figures follow: the
cross-modal site pair covering the most layers (Seamless: text_encoder vs speech_encoder).
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd

from engine import uncertainty

NULL_COLUMNS = ("null_mean", "null_sd", "z", "p_value")
COLUMNS = ("model", "model_a", "model_b", "site_a", "layer_a", "language_a", "modality_a",
           "site_b", "layer_b", "language_b", "modality_b", "family", "metric", "score",
           "rank_a", "rank_b", "n", *NULL_COLUMNS, "permutations")
# What the analyses read; each side's model (tables of one model), the kernel's ranks and n,
# and the null, are optional.
OPTIONAL = ("model_a", "model_b", "rank_a", "rank_b", "n", *NULL_COLUMNS, "permutations")
REQUIRED = tuple(c for c in COLUMNS if c not in OPTIONAL)
CROSS_MODEL_SEP = "~"
CENTRAL_FAMILIES = ("cross_modal", "cross_lingual_text", "cross_lingual_speech",
                    "cross_modal_lingual")
ALPHA = 0.05  # the p-value a pair counts as above its null at
RESOURCE_ORDER = ("high", "medium", "low", "unknown")
RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
SUMMARY_JSON = "summary.json"
PLOTS_DIR = "plots"
_PRE, _POST = "pre_adaptor", "post_adaptor"


# ----------------------------------------------------------------------------- the table


def validate_table(table: pd.DataFrame, source: str = "results table") -> pd.DataFrame:
  """A checked copy with typed columns; the error names `source` and every missing column."""
  if not isinstance(table, pd.DataFrame):
    raise ValueError(f"{source}: expected a pandas DataFrame, got {type(table).__name__}")
  missing = [c for c in REQUIRED if c not in table.columns]
  if missing:
    raise ValueError(f"{source} lacks column(s) {', '.join(missing)} (has: "
                     f"{', '.join(map(str, table.columns))})")
  out = table.copy()
  for side in ("model_a", "model_b"):  # tables of one model written before models were compared
    if side not in out.columns:
      out.insert(list(out.columns).index("model") + 1 + (side == "model_b"), side, out["model"])
  for column in NULL_COLUMNS:
    if column not in out.columns:
      out[column] = np.nan
  if "permutations" not in out.columns:
    out["permutations"] = 0
  for column in ("layer_a", "layer_b", "score", *NULL_COLUMNS, "permutations") + tuple(
      c for c in ("rank_a", "rank_b", "n") if c in out.columns):
    values = pd.to_numeric(out[column], errors="coerce")
    bad = values.isna() & out[column].notna()
    if bad.any():
      raise ValueError(f"{source}: column {column} holds non-numbers, e.g. "
                       f"{out[column][bad].iloc[0]!r} in row {int(np.flatnonzero(bad)[0])}")
    out[column] = values.astype(np.float64) if column in NULL_COLUMNS else values
  out["permutations"] = out["permutations"].fillna(0).astype(np.int64)
  for column in ("layer_a", "layer_b"):
    if out[column].isna().any():
      raise ValueError(f"{source}: column {column} has empty cells")
    out[column] = out[column].astype(np.int64)
  for column in REQUIRED + ("model_a", "model_b"):
    if column not in ("layer_a", "layer_b", "score"):
      out[column] = out[column].astype(str)
  return out


def results_table(plan: Sequence, score, rank_a=None, rank_b=None, *, model: str,
                  metric: str, n: int | None = None, null: Mapping | None = None,
                  permutations: int = 0) -> pd.DataFrame:
  """The tidy table (COLUMNS, in order) for a plan of engine.pairs and its [P] scores.

  `model` is the sweep's --model: one name, or several comma-separated whose sites the plan's
  keys name (engine.keys.model_site); each side's model is then read from its site.
  null: the [P] arrays null_mean, null_sd, z, p_value (engine.svcca.calibrated's keys), or
  None for NaN (no null); `permutations` is how many permutations made them.
  """
  from engine.keys import model_slug, split_site  # pylint: disable=import-outside-toplevel
  from engine.pairs import plan_frame  # pylint: disable=import-outside-toplevel
  table = plan_frame(plan)
  size = len(table)
  names = model.split(",")
  by_slug = {model_slug(name): name for name in names}
  for side in ("a", "b"):
    split = [split_site(site) for site in table[f"site_{side}"]]
    if len(names) > 1 and any(slug not in by_slug for slug, _ in split):
      raise ValueError(f"the plan's sites name models other than {model}")
    table[f"model_{side}"] = [by_slug[slug] if len(names) > 1 else model for slug, _ in split]
    table[f"site_{side}"] = [site for _, site in split]
  for name, values in (("score", score), ("rank_a", rank_a), ("rank_b", rank_b)):
    if values is not None and np.shape(values) != (size,):
      raise ValueError(f"{name} has shape {np.shape(values)}, the plan has {size} pairs")
  table.insert(0, "model", [a if a == b else f"{a}{CROSS_MODEL_SEP}{b}"
                            for a, b in zip(table.model_a, table.model_b)])
  table["metric"] = metric
  table["score"] = np.asarray(score, np.float64)
  missing = np.full(size, -1, np.int64)
  table["rank_a"] = missing if rank_a is None else np.asarray(rank_a, np.int64)
  table["rank_b"] = missing if rank_b is None else np.asarray(rank_b, np.int64)
  table["n"] = -1 if n is None else int(n)
  for name in NULL_COLUMNS:
    values = np.full(size, np.nan) if null is None else np.asarray(null[name], np.float64)
    if values.shape != (size,):
      raise ValueError(f"{name} has shape {values.shape}, the plan has {size} pairs")
    table[name] = values
  table["permutations"] = int(permutations) if null is not None else 0
  return table[list(COLUMNS)]


def load_table(path: str | Path) -> pd.DataFrame:
  """Reads a results table: a .parquet/.csv file, or a directory holding results.parquet/.csv."""
  path = Path(path)
  if path.is_dir():
    candidates = [path / RESULTS_PARQUET, path / RESULTS_CSV]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
      raise ValueError(f"no results table in {path} (looked for {RESULTS_PARQUET} and "
                       f"{RESULTS_CSV})")
    path = found
  if not path.is_file():
    raise ValueError(f"results table {path} does not exist")
  readers = {".parquet": pd.read_parquet, ".csv": pd.read_csv}
  if path.suffix not in readers:
    raise ValueError(f"results table {path}: expected a .parquet or .csv file")
  try:
    table = readers[path.suffix](path)
  except Exception as e:  # pyarrow and the CSV parser raise many types for unreadable files
    raise ValueError(f"results table {path} is unreadable: {type(e).__name__}: {e}") from e
  return validate_table(table, source=f"results table {path}")


def write_table(table: pd.DataFrame, out: str | Path) -> None:
  """results.parquet and results.csv in directory `out`, each written to a temporary file then
  renamed, so a reader never sees half a table."""
  out = Path(out)
  for name, write in ((RESULTS_PARQUET, table.to_parquet), (RESULTS_CSV, table.to_csv)):
    tmp = out / f".{name}.tmp"
    write(tmp, index=False)
    os.replace(tmp, out / name)


def _in_order(values: Sequence[str], first: Sequence[str] = ()) -> list[str]:
  return list(dict.fromkeys([v for v in first if v in set(values)] + list(values)))


def languages_of(table: pd.DataFrame) -> list[str]:
  """Languages in the order the sweep wrote them."""
  return list(dict.fromkeys(np.ravel(table[["language_a", "language_b"]].to_numpy())))


def language_info(languages: pd.DataFrame | None, codes: Sequence[str]) -> pd.DataFrame:
  """code, name, resource (high|medium|low|unknown) for `codes`, from the language table.

  `languages` defaults to engine.data.languages.language_table(); it needs columns code and
  resource (name optional). Codes it lacks get resource 'unknown'.
  """
  if languages is None:
    from engine.data.languages import language_table
    languages = language_table()
  for column in ("code", "resource"):
    if column not in languages.columns:
      raise ValueError(f"language table lacks column {column!r} (has: "
                       f"{', '.join(map(str, languages.columns))})")
  info = languages.set_index("code")
  rows = []
  for code in codes:
    row = info.loc[code] if code in info.index else None
    rows.append({"language": code,
                 "name": str(row["name"]) if row is not None and "name" in info else code,
                 "resource": str(row["resource"]) if row is not None else "unknown"})
  return pd.DataFrame(rows, columns=["language", "name", "resource"])


# ----------------------------------------------------------------------------- main sites


def main_sites(table: pd.DataFrame) -> dict[str, tuple[str | None, str | None]]:
  """model -> (text site, speech site) the layer-wise analyses follow.

  The cross-modal site pair with the most layers; without cross-modal rows, the text and the
  speech site with the most layers in the cross-lingual rows (None where there are none).
  """
  out = {}
  for model, t in table.groupby("model", sort=False):
    cm = t[t.family == "cross_modal"]
    if len(cm):
      depth = cm.groupby(["site_a", "site_b"], sort=False).layer_a.nunique()
      out[model] = tuple(depth.idxmax())
      continue
    sites = []
    for family in ("cross_lingual_text", "cross_lingual_speech"):
      rows = t[t.family == family]
      sites.append(rows.groupby("site_a", sort=False).layer_a.nunique().idxmax()
                   if len(rows) else None)
    out[model] = tuple(sites)
  return out


def _resolve_sites(table, sites):
  if sites is None:
    return main_sites(table)
  return {model: tuple(sites) for model in table.model.unique()}


# ----------------------------------------------------------------------------- analyses


def corrected(table: pd.DataFrame) -> pd.Series:
  """The chance-corrected score, score - null_mean (NaN where the row has no null)."""
  return table.score - table.null_mean


def has_null(table: pd.DataFrame) -> bool:
  """Whether every row carries a null, so findings can be chance-corrected."""
  return bool(len(table)) and bool(np.isfinite(table.null_mean.to_numpy(float)).all())


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
  main = _resolve_sites(table, sites)
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
  main = _resolve_sites(table, sites)
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
  main = _resolve_sites(table, sites)
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
  main = _resolve_sites(table, sites)
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


# ----------------------------------------------------------------------------- findings


class _Finding(NamedTuple):
  """One finding of one (model, metric): a statistic of resampled languages, per basis."""
  name: str
  where: dict  # layer, layer_speech or group, as applicable
  members: np.ndarray  # positions (in the table's languages) the bootstrap resamples
  statistic: Callable[[str], Callable[[np.ndarray], np.ndarray]]  # column -> idx -> values
  rows: pd.DataFrame  # the pairs it reads, for their p-values


def _vector(rows: pd.DataFrame, position: Mapping[str, int], size: int, column: str):
  values = np.full(size, np.nan)
  i = rows["_i"].to_numpy(int) if "_i" in rows else rows.language_a.map(position).to_numpy(int)
  values[i] = rows[column].to_numpy(float)
  return values


def _pairs_matrix(rows: pd.DataFrame, position: Mapping[str, int], size: int, column: str,
                  symmetric: bool = True):
  values = np.full((size, size), np.nan)
  i = rows["_i"].to_numpy(int) if "_i" in rows else rows.language_a.map(position).to_numpy(int)
  j = rows["_j"].to_numpy(int) if "_j" in rows else rows.language_b.map(position).to_numpy(int)
  values[i, j] = rows[column].to_numpy(float)
  if symmetric:  # for means over pairs an unordered pair counts once either way
    values[j, i] = rows[column].to_numpy(float)
  return values


def _present(per_language=(), pairs=()) -> np.ndarray:
  """Positions of languages with a finite value in per-language arrays [L] or [L, T], or in
  either side of language x language matrices [L, L]."""
  seen = None
  for a in per_language:
    hit = np.isfinite(np.asarray(a)).reshape(len(a), -1).any(1)
    seen = hit if seen is None else seen | hit
  for m in pairs:
    ok = np.isfinite(np.asarray(m))
    hit = ok.any(0) | ok.any(1)
    seen = hit if seen is None else seen | hit
  return np.flatnonzero(seen) if seen is not None else np.zeros(0, int)


def _group_findings(t: pd.DataFrame, main: tuple, effect: pd.DataFrame) -> list[_Finding]:
  """The findings a (model, metric) slice of the table supports."""
  text_site, speech_site = main
  langs = languages_of(t)
  position = {code: i for i, code in enumerate(langs)}
  size = len(langs)
  codes = pd.Index(langs)
  t = t.assign(corrected=corrected(t).to_numpy(), _i=codes.get_indexer(t.language_a),
               _j=codes.get_indexer(t.language_b))
  out: list[_Finding] = []

  cm_rows = t[(t.family == "cross_modal") & (t.site_a == text_site) & (t.site_b == speech_site)]
  layer_pairs = sorted(set(zip(cm_rows.layer_a, cm_rows.layer_b)))
  cm_at = {lp: cm_rows[(cm_rows.layer_a == lp[0]) & (cm_rows.layer_b == lp[1])]
           for lp in layer_pairs}

  @functools.lru_cache(maxsize=None)
  def cm(column):  # [L, T]
    return np.stack([_vector(cm_at[lp], position, size, column) for lp in layer_pairs], 1)

  lt_rows = t[(t.family == "cross_lingual_text") & (t.site_a == text_site)]
  ls_rows = t[(t.family == "cross_lingual_speech") & (t.site_a == speech_site)]
  lt_layers, ls_layers = sorted(set(lt_rows.layer_a)), sorted(set(ls_rows.layer_a))

  cache: dict = {}

  def matrices(rows, layers, column):
    key = (id(rows), column)
    if key not in cache:
      cache[key] = {l: _pairs_matrix(rows[rows.layer_a == l], position, size, column)
                    for l in layers}
    return cache[key]

  if len(layer_pairs) >= 2:
    x = np.array([lp[0] for lp in layer_pairs], float)
    out.append(_Finding(
        "cross_modal_trend", {}, _present([cm("score")]),
        lambda c: (lambda a: lambda idx: uncertainty.slope(
            x, uncertainty.layer_means(a, idx)))(cm(c)), cm_rows))

  gap_layers = [lp for lp in layer_pairs if lp[0] in lt_layers or lp[1] in ls_layers]
  nan_pairs = np.full((size, size), np.nan)

  def gap_statistic(lps):
    def make(column):
      a, lt, ls = cm(column), matrices(lt_rows, lt_layers, column), matrices(
          ls_rows, ls_layers, column)
      columns = [layer_pairs.index(lp) for lp in lps]

      def stat(idx):
        cm_mean = uncertainty.layer_means(a[:, columns], idx)  # [..., k]
        language = []
        for lp in lps:
          parts = [uncertainty.pair_mean(m[l], idx) for m, l in ((lt, lp[0]), (ls, lp[1]))
                   if l in m]
          language.append(np.nanmean(np.stack(parts), 0) if len(parts) > 1 else parts[0])
        return np.mean(np.stack(language, -1) - cm_mean, -1)
      return stat
    return make

  for lp in gap_layers:
    rows = pd.concat([cm_at[lp], lt_rows[lt_rows.layer_a == lp[0]],
                      ls_rows[ls_rows.layer_a == lp[1]]])
    out.append(_Finding("modality_vs_language_gap", {"layer": int(lp[0]),
                                                      "layer_speech": int(lp[1])},
                        _present([cm("score")[:, layer_pairs.index(lp)]],
                                 [matrices(lt_rows, lt_layers, "score").get(lp[0], nan_pairs),
                                  matrices(ls_rows, ls_layers, "score").get(lp[1], nan_pairs)]),
                        gap_statistic([lp]), rows))
  if len(gap_layers) >= 2:
    rows = pd.concat([cm_rows, lt_rows, ls_rows])
    out.append(_Finding("modality_vs_language_gap_mean", {},
                        _present([cm("score")], [*matrices(lt_rows, lt_layers, "score").values(),
                                                 *matrices(ls_rows, ls_layers, "score").values()]),
                        gap_statistic(gap_layers), rows))

  if lt_layers and ls_layers:
    from engine.pairs import align_layers  # pylint: disable=import-outside-toplevel
    matched = align_layers(lt_layers, ls_layers, align="relative")

    def speech_text(column):
      lt, ls = matrices(lt_rows, lt_layers, column), matrices(ls_rows, ls_layers, column)
      return lambda idx: np.mean(np.stack([uncertainty.pair_mean(ls[s], idx) -
                                           uncertainty.pair_mean(lt[l], idx)
                                           for l, s in matched], -1), -1)
    members = _present(pairs=[*matrices(lt_rows, lt_layers, "score").values(),
                              *matrices(ls_rows, ls_layers, "score").values()])
    out.append(_Finding("speech_vs_text_cross_lingual",
                        {"matched_layers": [[int(l), int(s)] for l, s in matched]}, members,
                        speech_text, pd.concat([lt_rows, ls_rows])))

  cml_rows = t[(t.family == "cross_modal_lingual") & (t.site_a == text_site) &
               (t.site_b == speech_site)]
  cml_layers = [lp for lp in layer_pairs
                if ((cml_rows.layer_a == lp[0]) & (cml_rows.layer_b == lp[1])).any()]
  if cml_layers:
    def same_language(column):
      a = cm(column)
      columns = [layer_pairs.index(lp) for lp in cml_layers]
      ms = [_pairs_matrix(cml_rows[(cml_rows.layer_a == lp[0]) & (cml_rows.layer_b == lp[1])],
                          position, size, column, symmetric=False) for lp in cml_layers]
      return lambda idx: np.mean(uncertainty.layer_means(a[:, columns], idx) - np.stack(
          [uncertainty.pair_mean(m, idx) for m in ms], -1), -1)
    out.append(_Finding("same_language_advantage",
                        {"layers": [[int(l), int(s)] for l, s in cml_layers]},
                        _present([cm("score")]), same_language, pd.concat([cm_rows, cml_rows])))

  if len(effect):
    adaptor_rows = t[(t.family == "cross_modal") &
                     t.site_b.isin([effect.pre_site.iloc[0], effect.post_site.iloc[0]]) &
                     (t.layer_a == effect.layer_text.iloc[0]) &
                     (t.site_a == effect.site_text.iloc[0])]
    for group, e in effect.groupby("resource", sort=False):
      members = np.array([position[c] for c in e.language if c in position], int)
      values = {"score": _vector(e.rename(columns={"language": "language_a"}), position, size,
                                 "effect"),
                "corrected": _vector(e.rename(columns={"language": "language_a"}), position,
                                     size, "effect_corrected")}
      members = members[np.isfinite(values["score"][members])]
      out.append(_Finding("adaptor_effect", {"group": group}, members,
                          (lambda v: lambda c: lambda idx: uncertainty.vector_mean(v[c], idx))(
                              values),
                          adaptor_rows[adaptor_rows.language_a.isin(e.language)]))
  return out


_HEADS = {
    "cross_modal_trend": "cross-modal similarity vs depth (slope per layer)",
    "modality_vs_language_gap": "modality gap - language gap",
    "modality_vs_language_gap_mean": "modality gap - language gap, mean over layers",
    "speech_vs_text_cross_lingual": "cross-lingual similarity, speech - text (layers matched "
                                    "by relative depth)",
    "same_language_advantage": "text vs speech, same language - different languages",
    "adaptor_effect": "adaptor effect (post - pre adaptor cross-modal score)",
}


def _num(x: float) -> str:
  return "nan" if not np.isfinite(x) else (f"{x:+.3f}" if abs(x) >= 0.001 or x == 0
                                           else f"{x:+.1e}")


def _excludes_zero(low: float, high: float) -> bool | None:
  if not (np.isfinite(low) and np.isfinite(high)):
    return None
  return bool(low > 0 or high < 0)


def _statement(rec: dict) -> str:
  where = rec.get("where", {})
  head = _HEADS[rec["finding"]]
  if "layer" in where:
    head = f"layer {where['layer']} (speech layer {where['layer_speech']}): {head}"
  if "group" in where:
    head = f"{head}, {where['group']} resource"
  if rec["finding"] == "cross_modal_trend":
    sign = rec["ci_low"] > 0, rec["ci_high"] < 0
    head = ("cross-modal similarity rises with depth" if sign[0] else
            "cross-modal similarity falls with depth" if sign[1] else
            "cross-modal similarity vs depth: no clear trend") + ", slope per layer"
  ci = f"[{rec['confidence']:.0%} CI {_num(rec['ci_low'])}, {_num(rec['ci_high'])}]"
  raw_ci = f"[{_num(rec['raw_ci_low'])}, {_num(rec['raw_ci_high'])}]"
  n = f"over {rec['n_languages']} languages"

  def verdict(flag, what):
    return (f"too few languages for an interval" if flag is None else
            f"distinguishable from {what}" if flag else f"not distinguishable from {what}")

  if rec["basis"] == "chance-corrected":
    text = (f"{head}: {_num(rec['estimate'])} chance-corrected {ci} {n}: "
            f"{verdict(rec['beyond_chance'], 'chance')}; raw {_num(rec['raw'])} {raw_ci}: "
            f"{verdict(rec['nonzero'], 'zero')}")
  else:
    text = (f"{head}: {_num(rec['raw'])} raw (no null) {ci} {n}: "
            f"{verdict(rec['nonzero'], 'zero')}; chance level unknown (no null in the table)")
  if rec.get("pairs_above_null") is not None:
    text += (f"; {rec['pairs_above_null']} of {rec['pairs']} pairs above their null "
             f"(p<{ALPHA:g})")
  return text


def _finding_id(rec: Mapping) -> str:
  where = ",".join(f"{k}={v}" for k, v in rec.get("where", {}).items())
  return f"{rec['model']}|{rec['metric']}|{rec['finding']}|{where}"


def _all_findings(table: pd.DataFrame, languages, sites) -> list[tuple[dict, _Finding]]:
  main = _resolve_sites(table, sites)
  effect = adaptor_effect(table, languages=languages, sites=sites)
  out = []
  for (model, metric), t in table.groupby(["model", "metric"], sort=False):
    e = effect[(effect.model == model) & (effect.metric == metric)]
    for f in _group_findings(t, main[model], e):
      out.append(({"model": model, "metric": metric, "finding": f.name, "where": f.where,
                   "null": has_null(t)}, f))
  return out


def findings(table: pd.DataFrame, *, languages: pd.DataFrame | None = None,
             sites: tuple[str, str] | None = None, resamples: int = uncertainty.RESAMPLES,
             seed: int = uncertainty.SEED, confidence: float = uncertainty.CONFIDENCE,
             method: str = uncertainty.METHOD, only: Sequence[str] | None = None
             ) -> list[dict]:
  """The paper's claims, each with a bootstrap interval over languages, per (model, metric).

  cross_modal_trend              least-squares slope over layers of the mean cross-modal
                                 score (main sites); rises_with_depth: its interval is > 0.
  modality_vs_language_gap       per cross-modal layer pair: modality gap - language gap
                                 (= mean cross-lingual score - mean cross-modal score; > 0:
                                 modality separates more than language); and its mean over
                                 layers (modality_vs_language_gap_mean).
  speech_vs_text_cross_lingual   mean over layers matched by relative depth of (cross-lingual
                                 speech - cross-lingual text); < 0: speech differs more
                                 across languages than text.
  same_language_advantage        where the table has cross_modal_lingual pairs: text vs
                                 speech of one language - of two languages, mean over layers.
  adaptor_effect                 per resource group: mean adaptor effect.

  Each record: `estimate` with `ci_low`, `ci_high` on the basis (chance-corrected when the
  table has a null, else raw), `raw` with `raw_ci_low`, `raw_ci_high`; `beyond_chance`
  (corrected interval excludes 0; None without a null), `nonzero` (raw interval excludes 0),
  `pairs_above_null` of `pairs` (p < ALPHA), `n_languages` resampled, and `text`, the
  sentence the closing lines print. Intervals: uncertainty.language_interval (scipy's
  bootstrap over languages, `method`, `resamples`, `seed`). only: finding names to compute.
  """
  out = []
  for rec, f in _all_findings(table, languages, sites):
    if only is not None and f.name not in only:
      continue
    n = len(f.members)
    values = {}
    for column in ("score", "corrected") if rec["null"] else ("score",):
      stat = f.statistic(column)
      resampled = (lambda s: lambda idx: s(f.members[idx]))(stat)
      estimate = float(resampled(np.arange(n))) if n else float("nan")
      low, high = uncertainty.language_interval(resampled, n, resamples=resamples, seed=seed,
                                                confidence=confidence, method=method)
      values[column] = (estimate, low, high)
    raw = values["score"]
    basis = values.get("corrected", raw)
    p = f.rows.p_value.to_numpy(float)
    rec.update(basis="chance-corrected" if rec["null"] else "raw (no null)",
               estimate=basis[0], ci_low=basis[1], ci_high=basis[2],
               raw=raw[0], raw_ci_low=raw[1], raw_ci_high=raw[2], n_languages=n,
               beyond_chance=_excludes_zero(*basis[1:]) if rec["null"] else None,
               nonzero=_excludes_zero(*raw[1:]),
               pairs_above_null=int((p < ALPHA).sum()) if rec["null"] else None,
               pairs=int(len(p)), confidence=confidence, method=method, resamples=resamples,
               seed=seed)
    if f.name == "cross_modal_trend":
      rec["rises_with_depth"] = bool(np.isfinite(basis[1]) and basis[1] > 0)
    rec["id"] = _finding_id(rec)
    rec["text"] = _statement(rec)
    del rec["null"]
    out.append(rec)
  return out


def point_findings(table: pd.DataFrame, *, languages: pd.DataFrame | None = None,
                   sites: tuple[str, str] | None = None) -> dict[str, float]:
  """{finding id: estimate} on the findings' basis, without intervals (cheap)."""
  out = {}
  for rec, f in _all_findings(table, languages, sites):
    column = "corrected" if rec["null"] else "score"
    n = len(f.members)
    out[_finding_id(rec)] = float(f.statistic(column)(f.members)) if n else float("nan")
  return out


def sentence_bootstrap(table: pd.DataFrame, rescore: Callable[[np.ndarray], np.ndarray], *,
                       replicates: int, seed: int = 0, n: int | None = None,
                       languages: pd.DataFrame | None = None,
                       sites: tuple[str, str] | None = None,
                       confidence: float = uncertainty.CONFIDENCE) -> list[dict]:
  """Percentile intervals of every finding over resamples of the sentences (`--bootstrap`).

  rescore(rows) -> the table's [P] scores (its row order, the plan's) recomputed on sentence
  rows `rows` (see uncertainty.plan_rescorer). Each replicate keeps the table's null_mean
  (see engine.uncertainty on what that means). n: sentences, default the table's `n`.
  Returns one record per finding: id, model, metric, finding, where, sentence_ci_low,
  sentence_ci_high, sentence_bias (mean replicate - estimate), replicates, seed.
  """
  if n is None:
    n = int(table.n.iloc[0]) if "n" in table and len(table) else -1
  if n < 2:
    raise ValueError(f"--bootstrap needs the number of sentences (the table's n is {n})")
  count = len(languages_of(table)) if len(table) else 0
  if count < uncertainty.MIN_LANGUAGES:
    raise ValueError(f"--bootstrap needs at least {uncertainty.MIN_LANGUAGES} languages, the "
                     f"table has {count}")

  def estimate(rows):
    scores = np.asarray(rescore(rows), np.float64)
    if scores.shape != (len(table),):
      raise ValueError(f"rescore returned shape {scores.shape}, the table has {len(table)} rows")
    return point_findings(table.assign(score=scores), languages=languages, sites=sites)

  intervals = uncertainty.sentence_intervals(estimate, n, replicates=replicates, seed=seed,
                                             confidence=confidence)
  observed = point_findings(table, languages=languages, sites=sites)
  out = []
  for rec, _ in _all_findings(table, languages, sites):
    low, high, mean = intervals.get(_finding_id(rec), (float("nan"),) * 3)
    out.append({"id": _finding_id(rec), "model": rec["model"], "metric": rec["metric"],
                "finding": rec["finding"], "where": rec["where"], "sentence_ci_low": low,
                "sentence_ci_high": high, "sentence_bias": mean - observed[_finding_id(rec)],
                "replicates": replicates, "seed": seed})
  return out


def jsonable(obj: Any) -> Any:
  """Plain JSON values: NaN/inf -> None, numpy scalars -> Python, frames -> records."""
  if isinstance(obj, pd.DataFrame):
    return [jsonable(r) for r in obj.to_dict(orient="records")]
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, (np.bool_, bool)):
    return bool(obj)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def _with_sentence_intervals(found: list[dict], sentence: Sequence[Mapping] | None) -> list[dict]:
  by_id = {s["id"]: s for s in sentence or ()}
  for rec in found:
    s = by_id.get(rec["id"])
    if s is None:
      continue
    rec.update(sentence_ci_low=s["sentence_ci_low"], sentence_ci_high=s["sentence_ci_high"],
               sentence_bias=s.get("sentence_bias"), sentence_replicates=s["replicates"])
    rec["text"] += (f"; over sentences [{_num(s['sentence_ci_low'])}, "
                    f"{_num(s['sentence_ci_high'])}] ({s['replicates']} replicates, "
                    f"replicate bias {_num(s.get('sentence_bias', float('nan')))})")
  return found


def summary(table: pd.DataFrame, *, languages: pd.DataFrame | None = None,
            sites: tuple[str, str] | None = None,
            sentence: Sequence[Mapping] | None = None) -> dict:
  """A JSON-able digest: what was compared, the null, the layer-wise series, gaps, adaptor
  effect, and `findings` (with the records of `sentence_bootstrap` merged in, if given)."""
  effect = adaptor_effect(table, languages=languages, sites=sites)
  permutations = sorted({int(p) for p in table.permutations.unique()}) if len(table) else []
  return jsonable({
      "null": {"present": has_null(table), "permutations": permutations,
               "chance_corrected": "score - null_mean" if has_null(table) else None},
      "bootstrap": {"over": "languages", "method": uncertainty.METHOD,
                    "resamples": uncertainty.RESAMPLES, "seed": uncertainty.SEED,
                    "confidence": uncertainty.CONFIDENCE},
      "rows": len(table),
      "models": list(table.model.unique()),
      "metrics": list(table.metric.unique()),
      "languages": languages_of(table) if len(table) else [],
      "families": {k: int(v) for k, v in table.family.value_counts(sort=False).items()},
      "main_sites": {m: {"text": s[0], "speech": s[1]}
                     for m, s in _resolve_sites(table, sites).items()},
      "findings": _with_sentence_intervals(findings(table, languages=languages, sites=sites),
                                           sentence),
      "similarity_by_layer": similarity_by_layer(table, sites=sites, main_only=True),
      "gaps_by_layer": gaps_by_layer(table, sites=sites),
      "adaptor_effect": effect,
      "adaptor_effect_by_resource": adaptor_effect_by_resource(effect),
  })


def write_summary(table: pd.DataFrame, path: str | Path, **kwargs) -> dict:
  """Writes `summary(table)` as JSON (atomically) and returns it."""
  path = Path(path)
  data = summary(table, **kwargs)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
  tmp.replace(path)
  return data
