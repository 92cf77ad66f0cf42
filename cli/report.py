"""Re-plots and re-summarises a finished (or partial) sweep from its results table alone.

  python -m cli.report --output_dir=/tmp/sweep
  python -m cli.report --table=/data/run1/results.csv --output_dir=/tmp/run1_report

Reads results.parquet (else results.csv) in --output_dir, or --table, and writes summary.json
and the figures (plots/) into --output_dir. Nothing is recomputed. Errors are printed as one
line naming the file, and the exit status is 1.
"""
from __future__ import annotations

from absl import app, flags

from cli.errors import one_line
from engine.report import describe, report

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Sweep output directory: holds the results table "
                    "(unless --table is given) and receives summary.json and plots/.")
flags.DEFINE_string("table", None, "Results table (.parquet or .csv); default: results.parquet, "
                    "else results.csv, in --output_dir.")
flags.DEFINE_list("sites", None, "text_site,speech_site the layer-wise figures follow (default: "
                  "the cross-modal site pair with the most layers).")
flags.mark_flag_as_required("output_dir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  return one_line("report", lambda: describe(report(FLAGS.output_dir, table=FLAGS.table,
                                                          sites=FLAGS.sites)))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
