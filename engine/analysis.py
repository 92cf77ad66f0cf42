"""The paper's analyses, computed from the tidy results table alone.

Everything here reads only the table a sweep writes (one row per scored pair), so figures and
summaries can be redone without touching activations. Columns (`COLUMNS`):

  model, model_a, model_b, site_a, layer_a, language_a, modality_a, site_b, layer_b,
  language_b, modality_b, family, metric, score, rank_a, rank_b, n

model_a and model_b are the models of the two sides; `model` is theirs when they are one model
(every row of a single-model sweep), else 'model_a~model_b' (families cross_model and
cross_model_modal of a sweep over several models).

`family` is the comparison family of engine.pairs (cross_modal, cross_lingual_text, ...). In a
cross-modal row side a is text and side b speech. Scores are similarities in [0, 1] (SVCCA,
PWCCA, CKA), so 1 - score is a distance.

The *main sites* of a model are the text and speech sites its layer-wise figures follow: the
cross-modal site pair covering the most layers (Seamless: text_encoder vs speech_encoder).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd

COLUMNS = ("model", "model_a", "model_b", "site_a", "layer_a", "language_a", "modality_a", "site_b", "layer_b",
           "language_b", "modality_b", "family", "metric", "score", "rank_a", "rank_b", "n")
# What the analyses read; the kernel's ranks and n are reported but not needed to re-plot.
REQUIRED = tuple(c for c in COLUMNS if c not in ("model_a", "model_b", "rank_a", "rank_b", "n"))
CROSS_MODEL_SEP = "~"
CENTRAL_FAMILIES = ("cross_modal", "cross_lingual_text", "cross_lingual_speech")
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
  for side in ("model_a", "model_b"):  # tables written before models were compared
    if side not in out.columns:
      out.insert(list(out.columns).index("model") + 1 + (side == "model_b"), side, out["model"])
  for column in ("layer_a", "layer_b", "score") + tuple(
      c for c in ("rank_a", "rank_b", "n") if c in out.columns):
    values = pd.to_numeric(out[column], errors="coerce")
    bad = values.isna() & out[column].notna()
    if bad.any():
      raise ValueError(f"{source}: column {column} holds non-numbers, e.g. "
                       f"{out[column][bad].iloc[0]!r} in row {int(np.flatnonzero(bad)[0])}")
    out[column] = values
  for column in ("layer_a", "layer_b"):
    if out[column].isna().any():
      raise ValueError(f"{source}: column {column} has empty cells")
    out[column] = out[column].astype(np.int64)
  for column in REQUIRED + ("model_a", "model_b"):
    if column not in ("layer_a", "layer_b", "score"):
      out[column] = out[column].astype(str)
  return out


def results_table(plan: Sequence, score, rank_a=None, rank_b=None, *, model: str,
                  metric: str, n: int | None = None) -> pd.DataFrame:
  """The tidy table (COLUMNS, in order) for a plan of engine.pairs and its [P] scores.

  `model` is the sweep's --model: one name, or several comma-separated whose sites the plan's
  keys name (engine.keys.model_site); each side's model is then read from its site.
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


def similarity_by_layer(table: pd.DataFrame, *, sites: tuple[str, str] | None = None,
                        main_only: bool = False) -> pd.DataFrame:
  """Mean and spread of each central family's scores at each layer.

  One row per (model, metric, family, site_a, site_b, layer_a, layer_b): `layer` is layer_a
  (the text layer for cross-modal pairs), `mean`, `std` (population), `min`, `max` and
  `count` over the family's scores there: one per language for cross-modal, one per language
  pair for cross-lingual families. `main` marks the series at the main sites (or `sites`).
  """
  rows = table[table.family.isin(CENTRAL_FAMILIES)]
  keys = ["model", "metric", "family", "site_a", "site_b", "layer_a", "layer_b"]
  g = rows.groupby(keys, sort=False).score
  out = pd.concat([g.mean().rename("mean"), g.std(ddof=0).rename("std"),
                   g.min().rename("min"), g.max().rename("max"),
                   g.count().rename("count")], axis=1).reset_index()
  out = out.rename(columns={"layer_a": "layer"})
  main = _resolve_sites(table, sites)
  text_site = out.model.map(lambda m: main.get(m, (None, None))[0])
  speech_site = out.model.map(lambda m: main.get(m, (None, None))[1])
  out["main"] = (((out.family == "cross_modal") & (out.site_a == text_site) &
                  (out.site_b == speech_site)) |
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
                          language does).
  """
  columns = ["model", "metric", "site_text", "layer", "site_speech", "layer_speech",
             "modality_gap", "language_gap_text", "language_gap_speech", "language_gap",
             "excess", "n_languages"]
  main = _resolve_sites(table, sites)
  rows = []
  for (model, metric), t in table.groupby(["model", "metric"], sort=False):
    text_site, speech_site = main[model]
    cm = t[(t.family == "cross_modal") & (t.site_a == text_site) & (t.site_b == speech_site)]
    cm = cm.groupby(["layer_a", "layer_b"]).score.agg(["mean", "count"])
    lt = t[(t.family == "cross_lingual_text") & (t.site_a == text_site)]
    lt = lt.groupby("layer_a").score.mean()
    ls = t[(t.family == "cross_lingual_speech") & (t.site_a == speech_site)]
    ls = ls.groupby("layer_a").score.mean()
    for (layer_t, layer_s), row in cm.iterrows():
      gap_t = 1.0 - lt.get(layer_t, np.nan)
      gap_s = 1.0 - ls.get(layer_s, np.nan)
      both = [g for g in (gap_t, gap_s) if not np.isnan(g)]
      language_gap = float(np.mean(both)) if both else np.nan
      rows.append([model, metric, text_site, int(layer_t), speech_site, int(layer_s),
                   1.0 - row["mean"], gap_t, gap_s, language_gap,
                   1.0 - row["mean"] - language_gap, int(row["count"])])
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
  and each adaptor site's deepest layer. The adaptor sites default to those of the 'adaptor'
  rows, else 'pre_adaptor' / 'post_adaptor'. Rows carry the language's name and resource group
  (`languages`: the language table, see `language_info`) and are ordered high, medium, low,
  then as the sweep wrote them. Empty when the table lacks these pairs.
  """
  columns = ["model", "metric", "language", "name", "resource", "site_text", "layer_text",
             "pre_site", "post_site", "score_pre", "score_post", "effect"]
  pre_site, post_site = _adaptor_sites(table, pre_site, post_site)
  main = _resolve_sites(table, sites)
  rows = []
  for (model, metric), t in table.groupby(["model", "metric"], sort=False):
    cm = t[(t.family == "cross_modal") & t.site_b.isin([pre_site, post_site])]
    if main[model][0] is not None:
      cm = cm[cm.site_a == main[model][0]]
    if cm.empty:
      continue
    both = set(cm[cm.site_b == pre_site].layer_a) & set(cm[cm.site_b == post_site].layer_a)
    if not both:
      continue
    cm = cm[cm.layer_a == max(both)]
    for language, rows_l in cm.groupby("language_a", sort=False):
      score = {}
      for site in (pre_site, post_site):
        at = rows_l[rows_l.site_b == site]
        score[site] = at.loc[at.layer_b.idxmax(), "score"] if len(at) else np.nan
      rows.append([model, metric, language, rows_l.site_a.iloc[0], int(max(both)),
                   pre_site, post_site, score[pre_site], score[post_site],
                   score[post_site] - score[pre_site]])
  out = pd.DataFrame(rows, columns=[c for c in columns if c not in ("name", "resource")])
  info = language_info(languages, languages_of(table) if len(table) else [])
  out = out.merge(info, on="language", how="left")[columns]
  order = {code: i for i, code in enumerate(languages_of(table))} if len(table) else {}
  out["_r"] = out.resource.map(lambda r: RESOURCE_ORDER.index(r) if r in RESOURCE_ORDER else 9)
  out["_l"] = out.language.map(order)
  return out.sort_values(["model", "metric", "_r", "_l"]).drop(columns=["_r", "_l"]).reset_index(
      drop=True)


def adaptor_effect_by_resource(effect: pd.DataFrame) -> pd.DataFrame:
  """Mean, std (population) and count of the adaptor effect per resource group."""
  g = effect.groupby(["model", "metric", "resource"], sort=False).effect
  out = pd.concat([g.mean().rename("mean"), g.std(ddof=0).rename("std"),
                   g.count().rename("count")], axis=1).reset_index()
  out["_r"] = out.resource.map(lambda r: RESOURCE_ORDER.index(r) if r in RESOURCE_ORDER else 9)
  return out.sort_values(["model", "metric", "_r"]).drop(columns="_r").reset_index(drop=True)


class LanguageMatrix(NamedTuple):
  """A language x language matrix of one kind at one layer: rows side a, columns side b.

  kind: 'text' (cross-lingual text; symmetric), 'speech' (cross-lingual speech; symmetric) or
  'text_vs_speech' (rows text, columns speech; the diagonal is the cross-modal score).
  Same-modality diagonals are NaN (a representation against itself). Missing pairs are NaN.
  """
  model: str
  metric: str
  kind: str
  site_a: str
  layer_a: int
  site_b: str
  layer_b: int
  frame: pd.DataFrame


def _matrix(rows: pd.DataFrame, langs: list[str], symmetric: bool) -> pd.DataFrame:
  position = {code: i for i, code in enumerate(langs)}
  values = np.full((len(langs), len(langs)), np.nan)
  i = rows.language_a.map(position).to_numpy(int)
  j = rows.language_b.map(position).to_numpy(int)
  values[i, j] = rows.score.to_numpy(float)
  if symmetric:
    values[j, i] = rows.score.to_numpy(float)
  return pd.DataFrame(values, index=pd.Index(langs, name="a"), columns=pd.Index(langs, name="b"))


def language_matrices(table: pd.DataFrame, *, sites: tuple[str, str] | None = None
                      ) -> list[LanguageMatrix]:
  """Language x language matrices at every layer of the main (or given) sites.

  'text' at each text layer, 'speech' at each speech layer, 'text_vs_speech' at each aligned
  cross-modal layer pair (from cross_modal and cross_modal_lingual rows). Languages in the
  order the sweep wrote them.
  """
  main = _resolve_sites(table, sites)
  langs = languages_of(table)
  out = []
  for (model, metric), t in table.groupby(["model", "metric"], sort=False):
    text_site, speech_site = main[model]
    for kind, family, site in (("text", "cross_lingual_text", text_site),
                               ("speech", "cross_lingual_speech", speech_site)):
      rows = t[(t.family == family) & (t.site_a == site)]
      for layer, at in rows.groupby("layer_a"):
        out.append(LanguageMatrix(model, metric, kind, site, int(layer), site, int(layer),
                                  _matrix(at, langs, symmetric=True)))
    rows = t[t.family.isin(["cross_modal", "cross_modal_lingual"]) &
             (t.site_a == text_site) & (t.site_b == speech_site)]
    for (layer_a, layer_b), at in rows.groupby(["layer_a", "layer_b"]):
      out.append(LanguageMatrix(model, metric, "text_vs_speech", text_site, int(layer_a),
                                speech_site, int(layer_b), _matrix(at, langs, symmetric=False)))
  return out


# ----------------------------------------------------------------------------- summary


def _slope(x: np.ndarray, y: np.ndarray) -> float:
  ok = ~np.isnan(y)
  if ok.sum() < 2:
    return float("nan")
  return float(np.polyfit(x[ok].astype(float), y[ok], 1)[0])


def findings(table: pd.DataFrame, *, languages: pd.DataFrame | None = None,
             sites: tuple[str, str] | None = None) -> list[dict]:
  """The paper's four claims, checked per (model, metric) on this table.

  cross_modal_slope:            least-squares slope of the mean cross-modal score over layers
                                (main sites); rises_with_depth: slope > 0 and last > first.
  modality_gap_exceeds_language_gap: fraction of layers where modality_gap > language_gap.
  speech_minus_text_cross_lingual: mean over shared layers of (cross-lingual speech score -
                                cross-lingual text score); < 0: speech differs more across
                                languages than text.
  adaptor_effect_by_resource:   mean adaptor effect per resource group.
  """
  by_layer = similarity_by_layer(table, sites=sites, main_only=True)
  gaps = gaps_by_layer(table, sites=sites)
  effect = adaptor_effect(table, languages=languages, sites=sites)
  by_resource = adaptor_effect_by_resource(effect)
  out = []
  for (model, metric), t in table.groupby(["model", "metric"], sort=False):
    rec: dict[str, Any] = {"model": model, "metric": metric}
    series = by_layer[(by_layer.model == model) & (by_layer.metric == metric)]
    cm = series[series.family == "cross_modal"]
    if len(cm):
      rec["cross_modal_slope"] = _slope(cm.layer.to_numpy(), cm["mean"].to_numpy())
      rec["cross_modal_first"] = float(cm["mean"].iloc[0])
      rec["cross_modal_last"] = float(cm["mean"].iloc[-1])
      rec["rises_with_depth"] = bool(rec["cross_modal_slope"] > 0 and
                                     rec["cross_modal_last"] > rec["cross_modal_first"])
    g = gaps[(gaps.model == model) & (gaps.metric == metric)].dropna(
        subset=["modality_gap", "language_gap"])
    if len(g):
      rec["modality_gap_exceeds_language_gap"] = float((g.modality_gap > g.language_gap).mean())
    text = series[series.family == "cross_lingual_text"].set_index("layer")["mean"]
    speech = series[series.family == "cross_lingual_speech"].set_index("layer")["mean"]
    shared = text.index.intersection(speech.index)
    if len(shared):
      rec["speech_minus_text_cross_lingual"] = float((speech[shared] - text[shared]).mean())
    r = by_resource[(by_resource.model == model) & (by_resource.metric == metric)]
    if len(r):
      rec["adaptor_effect_by_resource"] = dict(zip(r.resource, r["mean"].astype(float)))
    out.append(rec)
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


def summary(table: pd.DataFrame, *, languages: pd.DataFrame | None = None,
            sites: tuple[str, str] | None = None) -> dict:
  """A JSON-able digest: what was compared, the layer-wise series, gaps, adaptor effect,
  and `findings`."""
  effect = adaptor_effect(table, languages=languages, sites=sites)
  return jsonable({
      "rows": len(table),
      "models": list(table.model.unique()),
      "metrics": list(table.metric.unique()),
      "languages": languages_of(table) if len(table) else [],
      "families": {k: int(v) for k, v in table.family.value_counts(sort=False).items()},
      "main_sites": {m: {"text": s[0], "speech": s[1]}
                     for m, s in _resolve_sites(table, sites).items()},
      "findings": findings(table, languages=languages, sites=sites),
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
