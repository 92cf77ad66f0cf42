"""The paper's figures, drawn from engine.analysis frames and saved as PNGs.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no display, no
global state), so plotting works on headless machines and inside tests.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import matplotlib
from matplotlib.figure import Figure

from engine import analysis
from engine.findings import findings
from engine.table import validate_table

FAMILY_STYLE = {  # label, colour
    "cross_modal": ("cross-modal (text vs speech, same language)", "#1f77b4"),
    "cross_lingual_text": ("cross-lingual, text", "#2ca02c"),
    "cross_lingual_speech": ("cross-lingual, speech", "#d62728"),
    "cross_modal_lingual": ("text vs speech, different languages", "#9467bd"),
}
RESOURCE_COLOURS = {"high": "#1b9e77", "medium": "#d95f02", "low": "#7570b3", "unknown": "#999999"}
KIND_TITLES = {"text": "text vs text", "speech": "speech vs speech",
               "text_vs_speech": "text (rows) vs speech (columns)"}
HEATMAP_CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="#e6e6e6")
CORRECTED_CMAP = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#e6e6e6")
DPI = 130


def _metric_label(metric: str) -> str:
  return {"svcca": "SVCCA", "pwcca": "PWCCA", "cka": "linear CKA"}.get(metric, metric)


def _save(fig: Figure, path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=DPI)
  return path


def _integer_layers(ax, layers) -> None:
  layers = sorted(set(int(l) for l in layers))
  if len(layers) <= 30:
    ax.set_xticks(layers)
  ax.set_xlim(min(layers) - 0.5, max(layers) + 0.5)


# ----------------------------------------------------------------------------- figures


def _family_panel(ax, by_layer, column, spread, *, band_null: bool, offsets_from=0):
  markers = iter(["D", "^", "v", "s", "P", "X"])
  offsets = iter([0.2, -0.2, 0.4, -0.4, 0.6, -0.6])
  for family, (label, colour) in FAMILY_STYLE.items():
    rows = by_layer[by_layer.family == family]
    main = rows[rows.main].sort_values("layer")
    if len(main):
      x, m = main.layer.to_numpy(), main[column].to_numpy(float)
      s = main[spread].fillna(0).to_numpy(float)
      site = (f"{main.site_a.iloc[0]} vs {main.site_b.iloc[0]}"
              if family in ("cross_modal", "cross_modal_lingual") else main.site_a.iloc[0])
      ax.plot(x, m, "-o", color=colour, lw=2, ms=4, label=f"{label} [{site}]")
      ax.fill_between(x, m - s, m + s, color=colour, alpha=0.15, lw=0)
      if band_null and main.null_mean.notna().all():
        null, sd = main.null_mean.to_numpy(float), main.null_sd.fillna(0).to_numpy(float)
        ax.plot(x, null, ":", color=colour, lw=1.6)
        for edge in (null - 2 * sd, null + 2 * sd):
          ax.plot(x, edge, "--", color=colour, lw=0.8, alpha=0.8)
    if family != "cross_modal":
      continue
    for (site_a, site_b), extra in rows[~rows.main].groupby(["site_a", "site_b"], sort=False):
      # Side by side, so points at one text layer (the adaptor's input and output) both show.
      ax.errorbar(extra.layer + next(offsets, 0.0), extra[column],
                  yerr=extra[spread].fillna(0), fmt=next(markers, "o"), color=colour,
                  mfc="white", mew=1.5, ms=7, capsize=3,
                  label=f"cross-modal: {site_a} vs {site_b} (\u00b11 std)")


def plot_similarity_by_layer(by_layer: pd.DataFrame, path: str | Path, *,
                             title: str | None = None) -> Path:
  """The central figure: mean similarity vs layer per family, bands = +-1 std across languages.

  `by_layer` is analysis.similarity_by_layer for one (model, metric). Main-site series are
  lines; other cross-modal site pairs (e.g. the adaptor's input and output against the text
  encoder's output) are single marked points at their text layer. With a null, the left
  panel also shows each family's chance level (dotted: mean null score; dashed: null mean
  +-2 null sd, where a single pair of unrelated representations would score) and a right
  panel the chance-corrected scores (score - null mean; 0 = chance).
  """
  null = len(by_layer) and by_layer.null_mean.notna().any()
  fig = Figure(figsize=(13, 5.8) if null else (8, 5.6), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, 2 if null else 1))
  metric = by_layer.metric.iloc[0] if len(by_layer) else "similarity"
  _family_panel(axes[0], by_layer, "mean", "std", band_null=bool(null))
  axes[0].set_ylabel(f"{_metric_label(metric)} similarity")
  if not null:
    axes[0].set_ylim(0, 1.02)  # with a null the chance band sets the scale instead
  axes[0].set_title("raw" + (" (dotted: null mean, dashed: null mean \u00b12 sd)"
                             if null else ""), fontsize=10)
  if null:
    _family_panel(axes[1], by_layer, "corrected_mean", "corrected_std", band_null=False)
    axes[1].axhline(0, color="black", lw=1)
    axes[1].set_ylabel(f"{_metric_label(metric)} \u2212 null mean (chance-corrected)")
    axes[1].set_title("chance-corrected (0 = chance)", fontsize=10)
  for ax in axes:
    ax.set_xlabel("layer (text layer for cross-modal pairs)")
    if len(by_layer):
      _integer_layers(ax, by_layer.layer)
      ax.set_xlim(right=max(by_layer.layer) + 0.9)
    ax.grid(alpha=0.3)
  fig.suptitle(title or "Similarity by layer\n(mean over languages; band = \u00b11 std)",
               fontsize=11)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
  return _save(fig, Path(path))


def plot_gaps(gaps: pd.DataFrame, path: str | Path, *, title: str | None = None) -> Path:
  """Modality gap vs language gap per layer (analysis.gaps_by_layer for one model, metric)."""
  fig = Figure(figsize=(7.5, 4.5), layout="constrained")
  ax = fig.subplots()
  g = gaps.sort_values("layer")
  x = g.layer.to_numpy()
  ax.plot(x, g.modality_gap, "-o", color=FAMILY_STYLE["cross_modal"][1], lw=2.2,
          label="modality gap: 1 \u2212 mean cross-modal score")
  ax.plot(x, g.language_gap, "-s", color="black", lw=2.2,
          label="language gap: mean of text and speech")
  ax.plot(x, g.language_gap_text, "--", color=FAMILY_STYLE["cross_lingual_text"][1], lw=1.4,
          label="language gap, text: 1 \u2212 mean cross-lingual text score")
  ax.plot(x, g.language_gap_speech, "--", color=FAMILY_STYLE["cross_lingual_speech"][1], lw=1.4,
          label="language gap, speech: 1 \u2212 mean cross-lingual speech score")
  ax.fill_between(x, g.modality_gap, g.language_gap, color="grey", alpha=0.12, lw=0)
  ax.set_xlabel(f"layer of {g.site_text.iloc[0]}" if len(g) else "layer")
  ax.set_ylabel("gap (1 \u2212 similarity)")
  ax.set_ylim(0, 1.02)
  if len(g):
    _integer_layers(ax, x)
  ax.grid(alpha=0.3)
  ax.set_title(title or "Modality gap vs language gap")
  ax.legend(loc="best", fontsize=8, framealpha=0.9)
  return _save(fig, Path(path))


def plot_adaptor_effect(effect: pd.DataFrame, path: str | Path, *, title: str | None = None,
                        intervals: Mapping[str, tuple[float, float, float]] | None = None
                        ) -> Path:
  """Adaptor effect per language as bars coloured and grouped by resource level, with each
  group's mean and its bootstrap interval (analysis.adaptor_effect for one model, metric).

  Bars are the chance-corrected effect (effect_corrected) when the table has a null, else the
  raw effect. intervals: resource group -> (estimate, low, high), from the adaptor_effect
  findings; drawn as a black marker with error bars at the group's centre.
  """
  corrected = "effect_corrected" in effect and effect.effect_corrected.notna().all() and len(
      effect)
  column = "effect_corrected" if corrected else "effect"
  n = len(effect)
  fig = Figure(figsize=(max(8.0, 0.32 * n + 2.5), 5.4), layout="constrained")
  ax = fig.subplots()
  x, start, positions, previous = 0.0, {}, [], None
  for resource in effect.resource:
    if previous is not None and resource != previous:
      x += 0.8  # a gap between resource groups
    positions.append(x)
    start.setdefault(resource, []).append(x)
    previous = resource
    x += 1.0
  colours = [RESOURCE_COLOURS.get(r, RESOURCE_COLOURS["unknown"]) for r in effect.resource]
  ax.bar(positions, effect[column], color=colours, width=0.8, alpha=0.85)
  for resource, xs in start.items():
    mean = effect[column][effect.resource == resource].mean()
    ax.hlines(mean, min(xs) - 0.45, max(xs) + 0.45, color="black", lw=1.2,
              linestyles="dashed")
    label = f"{resource} resource (n={len(xs)}): mean {mean:+.3f}"
    if intervals and resource in intervals:
      est, low, high = (np.nan if v is None else float(v) for v in intervals[resource])
      if np.isfinite(low) and np.isfinite(high):
        centre = (min(xs) + max(xs)) / 2
        ax.errorbar([centre], [est], yerr=[[est - low], [high - est]], fmt="o", color="black",
                    ms=6, capsize=6, lw=2, zorder=5)
        label += f" [95% CI {low:+.3f}, {high:+.3f}]"
    ax.bar(0, 0, color=RESOURCE_COLOURS.get(resource, RESOURCE_COLOURS["unknown"]),
           label=label)
  ax.axhline(0, color="black", lw=0.8)
  labels = [f"{name} ({code})" if name != code else code
            for name, code in zip(effect.name, effect.language)]
  ax.set_xticks(positions)
  ax.set_xticklabels(labels, rotation=55, ha="right", rotation_mode="anchor",
                     fontsize=8 if n > 12 else 9)
  if n:
    ax.set_xlim(-0.7, positions[-1] + 0.7)
    row = effect.iloc[0]
    what = "chance-corrected " if corrected else ""
    ax.set_ylabel(f"{what}\u0394 {_metric_label(row.metric)}: {row.post_site} \u2212 "
                  f"{row.pre_site}")
    sub = f"cross-modal score vs {row.site_text} layer {row.layer_text}"
    sub += (", minus the null's shift" if corrected else ", raw (no null)")
  else:
    sub = "no adaptor pairs"
  ax.grid(axis="y", alpha=0.3)
  ax.set_title(title or f"Length-adaptor effect per language\n({sub})")
  fig.legend(loc="outside lower center", ncols=1 if intervals else min(3, len(start)) or 1,
             fontsize=8, frameon=False)
  return _save(fig, Path(path))


def _panel(ax, m: analysis.LanguageMatrix, vmin: float, vmax: float, names):
  values = m.frame.to_numpy(dtype=float)
  image = ax.imshow(np.ma.masked_invalid(values), vmin=vmin, vmax=vmax,
                    cmap=CORRECTED_CMAP if m.corrected else HEATMAP_CMAP,
                    interpolation="nearest")
  n = len(m.frame)
  size = 9 if n <= 12 else (7 if n <= 24 else 6)
  ax.set_xticks(range(n))
  ax.set_yticks(range(n))
  ax.set_xticklabels([names.get(c, c) for c in m.frame.columns], rotation=90, fontsize=size)
  ax.set_yticklabels([names.get(c, c) for c in m.frame.index], fontsize=size)
  if n <= 10:
    for i in range(n):
      for j in range(n):
        if not np.isnan(values[i, j]):
          r, g, b, _ = image.cmap(image.norm(values[i, j]))
          dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
          ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                  color="white" if dark else "black")
  site = (f"{m.site_a} L{m.layer_a}" if m.kind != "text_vs_speech"
          else f"{m.site_a} L{m.layer_a} vs {m.site_b} L{m.layer_b}")
  ax.set_title(f"{KIND_TITLES[m.kind]}\n{site}", fontsize=9)
  ax.set_xlabel("language (b)" if m.kind != "text_vs_speech" else "speech language",
                fontsize=8)
  ax.set_ylabel("language (a)" if m.kind != "text_vs_speech" else "text language", fontsize=8)
  return image


def plot_language_heatmaps(matrices: Sequence[analysis.LanguageMatrix], out_dir: str | Path, *,
                           prefix: str = "languages_layer", names: dict | None = None,
                           title: str | None = None) -> list[Path]:
  """One figure per layer, a panel per kind (text, speech, text vs speech), one colour scale
  shared by every layer so layers compare. `matrices`: analysis.language_matrices for one
  (model, metric); panels are grouped by their side-a layer."""
  if not matrices:
    return []
  names = names or {}
  values = np.concatenate([m.frame.to_numpy(dtype=float).ravel() for m in matrices])
  values = values[~np.isnan(values)]
  vmin, vmax = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
  if matrices[0].corrected:  # diverging around chance (0)
    vmax = max(abs(vmin), abs(vmax), 1e-6)
    vmin = -vmax
  vmax = vmax if vmax > vmin else vmin + 1e-6
  by_layer: dict[int, list] = {}
  for m in matrices:
    by_layer.setdefault(m.layer_a, []).append(m)
  order = list(KIND_TITLES)
  paths = []
  width = max(len(m.frame) for m in matrices)
  panel = float(np.clip(0.2 * width + 1.6, 3.4, 7.5))
  for layer, ms in sorted(by_layer.items()):
    ms = sorted(ms, key=lambda m: order.index(m.kind))
    fig = Figure(figsize=(panel * len(ms) + 1.0, panel + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(ms)))
    for ax, m in zip(axes, ms):
      image = _panel(ax, m, vmin, vmax, names)
    what = (f"{_metric_label(ms[0].metric)} \u2212 null mean (0 = chance)" if ms[0].corrected
            else f"{_metric_label(ms[0].metric)} similarity (raw, no null)")
    fig.colorbar(image, ax=list(axes), shrink=0.85, label=what)
    note = ("; PWCCA weighted on the row (side a), one order scored"
            if ms[0].metric == "pwcca" else "")
    fig.suptitle(title or f"Language \u00d7 language similarity, layer {layer}: "
                 f"{'chance-corrected' if ms[0].corrected else 'raw'} "
                 f"(grey: not scored{note})", fontsize=11)
    paths.append(_save(fig, Path(out_dir) / f"{prefix}{layer:02d}.png"))
  return paths


# ----------------------------------------------------------------------------- everything


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def plot_all(table: pd.DataFrame, out_dir: str | Path, *, languages: pd.DataFrame | None = None,
             sites: tuple[str, str] | None = None, found: Sequence[dict] | None = None
             ) -> list[Path]:
  """Every figure the table supports, for each (model, metric), saved under `out_dir`.

  Figures whose rows are absent (e.g. no adaptor pairs) are skipped. With one model and one
  metric the files are similarity_by_layer.png, gaps_by_layer.png, adaptor_effect.png and
  languages_layerNN.png; otherwise each name gets a '{model}_{metric}_' prefix.
  found: findings of the table (computed when None), for the adaptor intervals.
  """
  table = validate_table(table)
  out_dir = Path(out_dir)
  by_layer = analysis.similarity_by_layer(table, sites=sites)
  gaps = analysis.gaps_by_layer(table, sites=sites)
  effect = analysis.adaptor_effect(table, languages=languages, sites=sites)
  matrices = analysis.language_matrices(table, sites=sites)
  if found is None and len(effect):
    found = findings(table, languages=languages, sites=sites)
  combos = list(table.groupby(["model", "metric"], sort=False).groups)
  paths = []
  for model, metric in combos:
    prefix = "" if len(combos) == 1 else f"{_slug(model)}_{metric}_"
    label = f"{model} \u00b7 {_metric_label(metric)}"

    def pick(frame):
      return frame[(frame.model == model) & (frame.metric == metric)]

    rows = pick(by_layer)
    if len(rows):
      paths.append(plot_similarity_by_layer(
          rows, out_dir / f"{prefix}similarity_by_layer.png",
          title=f"{label}: similarity by layer\n(mean over languages; band = \u00b11 std)"))
    rows = pick(gaps)
    if len(rows):
      paths.append(plot_gaps(rows, out_dir / f"{prefix}gaps_by_layer.png",
                             title=f"{label}: modality gap vs language gap"))
    rows = pick(effect)
    if len(rows):
      row = rows.iloc[0]
      intervals = {f["where"]["group"]: (f["estimate"], f["ci_low"], f["ci_high"])
                   for f in found or () if f["finding"] == "adaptor_effect" and
                   (f["model"], f["metric"]) == (model, metric)}
      paths.append(plot_adaptor_effect(
          rows, out_dir / f"{prefix}adaptor_effect.png",
          title=f"{label}: length-adaptor effect per language\ncross-modal score vs "
                f"{row.site_text} layer {row.layer_text}, by resource level",
          intervals=intervals))
    ms = [m for m in matrices if (m.model, m.metric) == (model, metric)]
    paths += plot_language_heatmaps(ms, out_dir, prefix=f"{prefix}languages_layer")
  return paths
