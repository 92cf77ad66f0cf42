"""The paper's findings, each with a bootstrap interval over languages, and summary.json.

A finding is stated on chance-corrected scores (score - null_mean) when the table has a null,
with the raw score alongside, and falls back to raw scores, labelled "raw (no null)", when it
does not. Each says whether it is distinguishable from chance and from zero (engine.uncertainty
does the interval maths through scipy.stats.bootstrap).
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd

from engine import uncertainty
from engine.analysis import (adaptor_effect, adaptor_effect_by_resource, gaps_by_layer,
                             similarity_by_layer)
from engine.table import ALPHA, corrected, has_null, languages_of, resolve_sites

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
  def interval(low, high, label=""):
    if not (math.isfinite(low) and math.isfinite(high)):
      return "(no interval)"
    return f"[{label}{_num(low)}, {_num(high)}]"

  ci = interval(rec["ci_low"], rec["ci_high"], f"{rec['confidence']:.0%} CI ")
  raw_ci = interval(rec["raw_ci_low"], rec["raw_ci_high"])
  n = f"over {rec['n_languages']} language{'s' if rec['n_languages'] != 1 else ''}"

  def verdict(flag, what):
    return ("too few languages for an interval" if flag is None else
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
  main = resolve_sites(table, sites)
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
                     for m, s in resolve_sites(table, sites).items()},
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
