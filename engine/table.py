"""The tidy results table: one row per scored pair, its columns, and reading and writing it.

Columns (`COLUMNS`):

  model, model_a, model_b, site_a, layer_a, language_a, modality_a, site_b, layer_b,
  language_b, modality_b, family, metric, score, rank_a, rank_b, n, null_mean, null_sd, z,
  p_value, permutations

model_a and model_b are the models of the two sides; `model` is theirs when they are one model
(every row of a single-model sweep), else 'model_a~model_b' (families cross_model and
cross_model_modal of a sweep over several models). Tables written before them read with
`model` on both sides.

`family` is the comparison family of engine.pairs (cross_modal, cross_lingual_text, ...). In a
cross-modal row side a is text and side b speech. PWCCA is asymmetric: a row's score is
weighted on side a (the text side of a cross-modal pair, the language listed first otherwise).

The null columns (`NULL_COLUMNS`) come from the sweep's permutation null (engine.null): the
mean and sd of the score over sentence permutations of one side, z and the permutation p-value;
`permutations` is how many (0: the null was off, and the four are NaN). Tables written before
the null existed read with NaN there. The *chance-corrected* score is score - null_mean.

The *main sites* of a model are the text and speech sites its layer-wise figures follow: the
cross-modal site pair covering the most layers (Seamless: text_encoder vs speech_encoder).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

NULL_COLUMNS = ("null_mean", "null_sd", "z", "p_value")
COLUMNS = ("model", "model_a", "model_b", "site_a", "layer_a", "language_a", "modality_a",
           "site_b", "layer_b", "language_b", "modality_b", "family", "metric", "score",
           "rank_a", "rank_b", "n", *NULL_COLUMNS, "permutations")
# What the analyses read; each side's model, the kernel's ranks and n, and the null, are
# optional.
OPTIONAL = ("model_a", "model_b", "rank_a", "rank_b", "n", *NULL_COLUMNS, "permutations")
CROSS_MODEL_SEP = "~"
REQUIRED = tuple(c for c in COLUMNS if c not in OPTIONAL)
CENTRAL_FAMILIES = ("cross_modal", "cross_lingual_text", "cross_lingual_speech",
                    "cross_modal_lingual")
ALPHA = 0.05  # the p-value a pair counts as above its null at
RESOURCE_ORDER = ("high", "medium", "low", "unknown")
RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
SUMMARY_JSON = "summary.json"
PLOTS_DIR = "plots"


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


def resolve_sites(table, sites):
  if sites is None:
    return main_sites(table)
  return {model: tuple(sites) for model in table.model.unique()}

def corrected(table: pd.DataFrame) -> pd.Series:
  """The chance-corrected score, score - null_mean (NaN where the row has no null)."""
  return table.score - table.null_mean


def has_null(table: pd.DataFrame) -> bool:
  """Whether every row carries a null, so findings can be chance-corrected."""
  return bool(len(table)) and bool(np.isfinite(table.null_mean.to_numpy(float)).all())
