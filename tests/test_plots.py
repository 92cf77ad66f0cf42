"""Figures: every plot the table supports is written as a readable PNG."""
import pandas as pd
from PIL import Image

from engine import analysis as A
from engine import table as T
from engine import plots
from tests.test_analysis import LANGS, LANGUAGES, LAYERS, synthetic_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path, min_size=(400, 300)):
  assert path.is_file(), path
  assert path.read_bytes()[:8] == PNG_MAGIC, path
  with Image.open(path) as image:
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], (path, image.size)
    # Something was drawn: not a single flat colour.
    assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(2)) > 1


def test_plot_all_writes_every_figure(tmp_path):
  paths = plots.plot_all(synthetic_table(), tmp_path, languages=LANGUAGES)
  names = [p.name for p in paths]
  assert names == (["similarity_by_layer.png", "gaps_by_layer.png", "adaptor_effect.png"] +
                   [f"languages_layer{l:02d}.png" for l in range(LAYERS)])
  for path in paths:
    check_png(path)
  with Image.open(tmp_path / "languages_layer00.png") as image:
    assert image.size[0] > 2 * image.size[1]  # three panels side by side


def test_figures_without_their_rows_are_skipped(tmp_path):
  table = synthetic_table()
  table = table[table.family.isin(["cross_lingual_text", "cross_lingual_speech"])]
  paths = plots.plot_all(table, tmp_path, languages=LANGUAGES)
  assert [p.name for p in paths][:1] == ["similarity_by_layer.png"]
  assert not (tmp_path / "adaptor_effect.png").exists()
  assert not (tmp_path / "gaps_by_layer.png").exists()


def test_several_models_get_their_own_files(tmp_path):
  table = synthetic_table()
  other = table.assign(model="facebook/seamless-m4t-v2-large", score=table.score * 0.9)
  both = pd.concat([table[table.layer_a == 0], other[other.layer_a == 0]])
  names = {p.name for p in plots.plot_all(both, tmp_path, languages=LANGUAGES)}
  assert "synthetic_svcca_similarity_by_layer.png" in names
  assert "facebook-seamless-m4t-v2-large_svcca_similarity_by_layer.png" in names


def test_single_figures(tmp_path):
  table = synthetic_table()
  by_layer = A.similarity_by_layer(table)
  check_png(plots.plot_similarity_by_layer(by_layer, tmp_path / "a" / "central.png"))
  check_png(plots.plot_gaps(A.gaps_by_layer(table), tmp_path / "gaps.png"))
  effect = A.adaptor_effect(table, languages=LANGUAGES)
  check_png(plots.plot_adaptor_effect(effect, tmp_path / "effect.png"))
  mats = [m for m in A.language_matrices(table) if m.layer_a == 1]
  (path,) = plots.plot_language_heatmaps(mats, tmp_path, prefix="m", names={"eng": "English"})
  assert path.name == "m01.png" and len(mats) == 3 and len(mats[0].frame) == len(LANGS)
  check_png(path)


def test_report_replots_from_the_table_alone(tmp_path):
  from engine import report
  synthetic_table().to_csv(tmp_path / T.RESULTS_CSV, index=False)
  stale = tmp_path / T.PLOTS_DIR / "languages_layer42.png"
  stale.parent.mkdir()
  stale.write_bytes(b"old")
  result = report.report(tmp_path, languages=LANGUAGES)
  assert result["summary"] == tmp_path / T.SUMMARY_JSON and result["summary"].is_file()
  assert len(result["plots"]) == 3 + LAYERS and not stale.exists()
  assert all(p.parent == tmp_path / T.PLOTS_DIR for p in result["plots"])
  assert result["findings"][0]["rises_with_depth"] is True
  assert "rises with depth" in report.describe(result)


def test_report_cli_errors_are_one_line_naming_the_file(tmp_path):
  import subprocess
  import sys
  synthetic_table().drop(columns=["family"]).to_parquet(tmp_path / T.RESULTS_PARQUET)
  missing = subprocess.run([sys.executable, "-m", "cli.report", f"--output_dir={tmp_path / 'x'}"],
                           capture_output=True, text=True)
  bad = subprocess.run([sys.executable, "-m", "cli.report", f"--output_dir={tmp_path}"],
                       capture_output=True, text=True)
  assert missing.returncode == 1 and bad.returncode == 1
  assert missing.stderr.strip().splitlines()[-1] == (
      f"report: error: results table {tmp_path / 'x'} does not exist")
  last = bad.stderr.strip().splitlines()[-1]
  assert last.startswith(f"report: error: results table {tmp_path / T.RESULTS_PARQUET} lacks "
                         "column(s) family")
