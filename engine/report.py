"""summary.json and the figures of a results table, written next to it; nothing recomputed.

Kept free of absl flags so the sweep, the report CLI and tests can all import it.
"""
from __future__ import annotations

from pathlib import Path

PLOT_PATTERNS = ("*similarity_by_layer.png", "*gaps_by_layer.png", "*adaptor_effect.png",
                 "*languages_layer[0-9][0-9].png")


def _clear_old_plots(plots_dir: Path) -> None:
  """Removes figures an earlier report wrote, so a smaller table leaves no stale layers."""
  for pattern in PLOT_PATTERNS:
    for path in plots_dir.glob(pattern):
      path.unlink()


def report(output_dir, *, table=None, languages=None, sites=None, sentence=None) -> dict:
  """Writes summary.json and the figures for a results table into `output_dir`.

  table: a DataFrame, a .parquet/.csv path, or None for the table in `output_dir`.
  languages: the language table (default engine.data.languages.language_table()).
  sentence: records of engine.findings.sentence_bootstrap to merge into the findings.
  Returns {'table': rows, 'summary': path, 'plots': [paths], 'findings': [...]}.
  """
  import pandas as pd  # pylint: disable=import-outside-toplevel

  from engine import plots  # pylint: disable=import-outside-toplevel  (matplotlib)
  from engine.findings import write_summary  # pylint: disable=import-outside-toplevel
  from engine.table import PLOTS_DIR, SUMMARY_JSON, load_table, validate_table  # pylint: disable=import-outside-toplevel
  output_dir = Path(output_dir)
  if table is None or not isinstance(table, pd.DataFrame):
    table = load_table(output_dir if table is None else table)
  else:
    table = validate_table(table)
  if table.empty:
    raise ValueError(f"results table for {output_dir} has no rows")
  if sites is not None and len(sites) != 2:
    raise ValueError(f"sites must be text_site,speech_site; got {','.join(sites)}")
  sites = tuple(sites) if sites else None
  output_dir.mkdir(parents=True, exist_ok=True)
  summary_path = output_dir / SUMMARY_JSON
  data = write_summary(table, summary_path, languages=languages, sites=sites,
                       sentence=sentence)
  plots_dir = output_dir / PLOTS_DIR
  plots_dir.mkdir(exist_ok=True)
  _clear_old_plots(plots_dir)
  paths = plots.plot_all(table, plots_dir, languages=languages, sites=sites,
                         found=data["findings"])
  return {"table": len(table), "summary": summary_path, "plots": paths,
          "findings": data["findings"]}


def describe(result: dict) -> str:
  """The closing lines: where things went, then each finding as a sentence with its interval."""
  lines = [f"{result['table']} pairs; summary: {result['summary']}",
           f"{len(result['plots'])} figures in {result['plots'][0].parent}"
           if result["plots"] else "no figures (the table has no rows they need)"]
  current = None
  for f in result["findings"]:
    if (f["model"], f["metric"]) != current:
      current = (f["model"], f["metric"])
      lines.append(f"{f['model']} {f['metric']} ({f['basis']}; {f['confidence']:.0%} "
                   f"{f['method']} intervals over languages, {f['resamples']} resamples):")
    lines.append(f"  {f['text']}")
  return "\n".join(lines)
