"""The main job: extract a corpus through a model, score every planned pair, analyse, plot.

  python -m cli.sweep                       # the offline default: bundled corpus, seamless-tiny
  python -m cli.sweep --model=facebook/seamless-m4t-v2-large --source=fleurs \
      --model_dtype=bfloat16 --batch_size=32 --output_dir=runs/seamless-large
  python -m cli.sweep --model=seamless-tiny,sonar-tiny --plan=cross_model   # models compared

With no flags it runs end to end offline into runs/default: the bundled corpus in every bundled
language, text and speech, tiny random SeamlessM4T v2, all sites and layers, SVCCA at 0.99, and
the paper's comparison families. Writes results.parquet / results.csv, summary.json and plots/
(by cli.report) next to the activation store and the checkpoints. Re-running the same command
resumes; other settings on an existing output directory are refused (--overwrite discards it).
Errors are printed as one line and the exit status is 1.

Across processes or hosts (jax.distributed), every process runs the same command with an
--output_dir they all see, plus --coordinator=HOST:PORT --num_processes=N --process_id=I (or
none of the three where JAX detects the cluster: Cloud TPU, SLURM, Open MPI, ...):

  python -m cli.sweep --coordinator=10.0.0.1:8476 --num_processes=2 --process_id=0 ...
  python -m cli.sweep --coordinator=10.0.0.1:8476 --num_processes=2 --process_id=1 ...

Each process extracts its share of the languages; only process 0 writes results.
"""
from __future__ import annotations

import logging
import warnings

import jax
from absl import app, flags
from absl import logging as absl_logging

from cli import corpus_flags
from cli.errors import one_line
from engine import distributed, settings
from engine.report import describe
from engine.report import report as write_report
from engine.sweep import run_sweep

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(corpus_flags)  # listed by --help with this module's own
corpus_flags.define(settings.Model, only=("model_dtype",))
corpus_flags.define(settings.Scoring)
corpus_flags.define(settings.Run, skip=corpus_flags.EXTRACTION_RUN)
corpus_flags.define(settings.Report)
flags.DEFINE_bool("overwrite", False, "Discard what the sweep wrote to --output_dir before.")
flags.DEFINE_bool("report", True, "Write summary.json and plots/ (as cli.report does) at the end.")
flags.DEFINE_string("coordinator", None, "Multi-process runs: HOST:PORT of process 0's "
                    "coordination service (with --num_processes and --process_id). Without the "
                    "three, a cluster JAX recognises (Cloud TPU, SLURM, Open MPI) is joined "
                    "automatically.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes take part.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0 to "
                     "--num_processes - 1; process 0 writes the results.")

_PROCESS_FLAGS = ("coordinator", "num_processes", "process_id")


def initialize_processes() -> bool:
  """Joins the multi-process job the flags (or a detected cluster) describe, before any JAX
  device is used (importing JAX and the engine touches none); True when there are several
  processes."""
  given = [name for name in _PROCESS_FLAGS if getattr(FLAGS, name) is not None]
  if given and len(given) < len(_PROCESS_FLAGS):
    missing = ", ".join(f"--{name}" for name in _PROCESS_FLAGS if name not in given)
    raise ValueError(f"--coordinator, --num_processes and --process_id go together; "
                     f"missing {missing}")
  if FLAGS.num_processes is not None and FLAGS.num_processes < 1:
    raise ValueError(f"--num_processes={FLAGS.num_processes} must be at least 1")
  if FLAGS.process_id is not None and not 0 <= FLAGS.process_id < FLAGS.num_processes:
    raise ValueError(f"--process_id={FLAGS.process_id} is not in 0..{FLAGS.num_processes - 1}")
  try:
    return distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  except (RuntimeError, KeyError) as e:  # no coordinator reached, or a half-described cluster
    where = (f"the coordinator {FLAGS.coordinator}" if FLAGS.coordinator else
             "the cluster detected from the environment")
    raise ConnectionError(f"could not join the multi-process job through {where}: "
                          f"{type(e).__name__}: {e}; a single process can be forced with "
                          "--coordinator=localhost:0 --num_processes=1 --process_id=0") from None


def settings_from_flags() -> settings.Settings:
  """The sweep's settings, as the flags give them."""
  return settings.from_flags(corpus_flags.values(FLAGS))


def report(output_dir, sentence=None) -> str:
  """summary.json and the figures from the finished table (engine.report, as cli.report does),
  with the sentence bootstrap's records if given."""
  return describe(write_report(output_dir, sentence=sentence))


def sweep_from_flags() -> str:
  if FLAGS.bootstrap and not FLAGS.report:
    raise ValueError(f"--bootstrap={FLAGS.bootstrap} writes its intervals into summary.json; "
                     "drop --noreport or --bootstrap")
  initialize_processes()
  result = run_sweep(settings_from_flags(), overwrite=FLAGS.overwrite)
  if jax.process_index() != 0:
    return (f"process {jax.process_index()} of {jax.process_count()}: {len(result.table)} pairs "
            "scored; process 0 writes the results")
  permutations = int(result.table.permutations.iloc[0]) if len(result.table) else 0
  chance = f", each with a null of {permutations} permutations" if permutations else ""
  lines = [f"{len(result.table)} pairs scored{chance} ({result.chunks_run} of {result.chunks} "
           f"chunks in this run); table: {result.output_dir / 'results.parquet'} and results.csv"]
  if result.degenerate:
    lines.append(f"note: {result.degenerate} representations keep a rank of at least half the "
                 f"{result.n} sentences; CCA inflates their scores (use more sentences)")
  if result.sentence is not None:
    lines.append(result.sentence.describe())
  if FLAGS.report:
    lines.append(report(result.output_dir,
                        result.sentence.records if result.sentence is not None else None))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:  # JAX and orbax log INFO lines (backends, saves)
    absl_logging.set_verbosity(absl_logging.WARNING)
  warnings.filterwarnings("ignore", category=FutureWarning)
  warnings.filterwarnings("ignore", message="no speech for language")  # reported per language
  logging.getLogger("datasets").setLevel(logging.WARNING)
  return one_line("sweep", sweep_from_flags)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
