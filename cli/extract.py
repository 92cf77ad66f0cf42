"""Extracts pooled activations of a parallel corpus into an activation store (resumable).

  python -m cli.extract --model=seamless-tiny --languages=eng,deu --output_dir=/tmp/acts
  python -m cli.extract --model=facebook/seamless-m4t-v2-large --source=fleurs \
      --fleurs_dir=/data/fleurs --model_dtype=bfloat16 --batch_size=32 --output_dir=/data/acts

Re-running the same command resumes an interrupted run. Errors are printed as one line and
the exit status is 1.
"""
from __future__ import annotations

import logging
import warnings

from absl import app, flags

from cli import corpus_flags
from cli.errors import one_line
from engine import model_checks, settings

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(corpus_flags)  # listed by --help with this module's own
corpus_flags.define(settings.Model, only=("model_dtype",))
flags.DEFINE_alias("dtype", "model_dtype")  # deprecated spelling of --model_dtype
flags.DEFINE_string("output_dir", None, "Activation store directory (created or resumed).")
flags.mark_flag_as_required("output_dir")


def parse_layers(values):
  if values is None:
    return None
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--layers must be integers, got {','.join(values)}") from None


def extract_from_flags() -> str:
  """Runs the extraction the flags describe; returns a one-paragraph summary."""
  from engine import data  # pylint: disable=import-outside-toplevel
  from engine.extract import extract  # pylint: disable=import-outside-toplevel
  from engine.models import get_adapter  # pylint: disable=import-outside-toplevel
  from engine.models.common import resolve_device  # pylint: disable=import-outside-toplevel
  layers = parse_layers(FLAGS.layers)
  model = settings.from_flags(corpus_flags.values(FLAGS)).model
  model_checks.check_model(model)  # a family's options, before any work
  corpus = data.load_corpus(FLAGS.source, data.resolve_languages(FLAGS.languages),
                            with_audio="speech" in FLAGS.modalities, split=FLAGS.split,
                            max_sentences=FLAGS.max_sentences, fleurs_dir=FLAGS.fleurs_dir,
                            cache_dir=FLAGS.cache_dir)
  adapter = get_adapter(model.name, device=str(resolve_device(FLAGS.device)),
                        dtype=model.dtype, **model_checks.adapter_options(model))
  report = extract(adapter, corpus, FLAGS.output_dir, modalities=FLAGS.modalities,
                   sites=FLAGS.sites, layers=layers, pooling=FLAGS.pooling,
                   batch_size=FLAGS.batch_size, max_speech_seconds=FLAGS.max_speech_seconds,
                   progress=FLAGS.progress)
  lines = [f"{len(report.completed)} representations completed, "
           f"{len(report.already_complete)} already complete, in {FLAGS.output_dir}"]
  for modality in ("text", "speech"):
    if report.sentences[modality]:
      lines.append(f"{modality}: {report.sentences[modality]} sentences, "
                   f"{report.throughput(modality):.1f} sentences/s")
  for key, reason in report.skipped.items():
    lines.append(f"skipped {key}: {reason}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  warnings.filterwarnings("ignore", category=FutureWarning)
  logging.getLogger("datasets").setLevel(logging.WARNING)
  return one_line("extract", extract_from_flags)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
