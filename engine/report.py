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


def report(output_dir, *, table=None, languages=None, sites=None) -> dict:
  """Writes summary.json and the figures for a results table into `output_dir`.

  table: a DataFrame, a .parquet/.csv path, or None for the table in `output_dir`.
  languages: the language table (default engine.data.languages.language_table()).
  Returns {'table': rows, 'summary': path, 'plots': [paths], 'findings': [...]}.
  """
  import pandas as pd  # pylint: disable=import-outside-toplevel

  from engine import analysis, plots  # pylint: disable=import-outside-toplevel
  output_dir = Path(output_dir)
  if table is None or not isinstance(table, pd.DataFrame):
    table = analysis.load_table(output_dir if table is None else table)
  else:
    table = analysis.validate_table(table)
  if table.empty:
    raise ValueError(f"results table for {output_dir} has no rows")
  if sites is not None and len(sites) != 2:
    raise ValueError(f"sites must be text_site,speech_site; got {','.join(sites)}")
  sites = tuple(sites) if sites else None
  output_dir.mkdir(parents=True, exist_ok=True)
  summary_path = output_dir / analysis.SUMMARY_JSON
  data = analysis.write_summary(table, summary_path, languages=languages, sites=sites)
  plots_dir = output_dir / analysis.PLOTS_DIR
  plots_dir.mkdir(exist_ok=True)
  _clear_old_plots(plots_dir)
  paths = plots.plot_all(table, plots_dir, languages=languages, sites=sites)
  return {"table": len(table), "summary": summary_path, "plots": paths,
          "findings": data["findings"]}


def describe(result: dict) -> str:
  lines = [f"{result['table']} pairs; summary: {result['summary']}",
           f"{len(result['plots'])} figures in {result['plots'][0].parent}"
           if result["plots"] else "no figures (the table has no rows they need)"]
  for f in result["findings"]:
    parts = [f"{f['model']} {f['metric']}:"]
    if "rises_with_depth" in f:
      parts.append(f"cross-modal {f['cross_modal_first']:.3f} -> {f['cross_modal_last']:.3f} "
                   f"({'rises' if f['rises_with_depth'] else 'does not rise'} with depth)")
    if f.get("modality_gap_exceeds_language_gap") is not None:
      parts.append(f"modality gap > language gap at "
                   f"{100 * f['modality_gap_exceeds_language_gap']:.0f}% of layers")
    if f.get("speech_minus_text_cross_lingual") is not None:
      parts.append(f"cross-lingual speech - text {f['speech_minus_text_cross_lingual']:+.3f}")
    if f.get("adaptor_effect_by_resource"):
      effect = ", ".join(f"{k} {v:+.3f}" for k, v in f["adaptor_effect_by_resource"].items()
                         if v is not None)
      parts.append(f"adaptor effect {effect}")
    lines.append(" ".join(parts[:1]) + " " + "; ".join(parts[1:]))
  return "\n".join(lines)
