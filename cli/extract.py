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

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(corpus_flags)  # listed by --help with this module's own
flags.DEFINE_enum("model_dtype", "float32", ["float32", "bfloat16", "float16"],
                  "Dtype the model runs in (as cli.sweep's --model_dtype).")
flags.DEFINE_alias("dtype", "model_dtype")  # deprecated spelling of --model_dtype
flags.DEFINE_string("output_dir", None, "Activation store directory (created or resumed).")
flags.mark_flag_as_required("output_dir")


def load_corpus():
  """The corpus the flags ask for (speech only when a speech modality is requested)."""
  from engine import data  # pylint: disable=import-outside-toplevel
  languages = data.resolve_languages(FLAGS.languages)
  with_audio = "speech" in FLAGS.modalities
  if FLAGS.source == "bundled":
    corpus = data.load_bundled(languages, with_audio=with_audio, cache_dir=FLAGS.cache_dir)
    if FLAGS.max_sentences is not None:
      corpus = data.first_sentences(corpus, FLAGS.max_sentences)
    return corpus
  return data.load_fleurs(languages, split=FLAGS.split, local_dir=FLAGS.fleurs_dir,
                          max_sentences=FLAGS.max_sentences, cache_dir=FLAGS.cache_dir)


def parse_layers(values):
  if values is None:
    return None
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--layers must be integers, got {','.join(values)}") from None


def extract_from_flags() -> str:
  """Runs the extraction the flags describe; returns a one-paragraph summary."""
  import datasets  # pylint: disable=import-outside-toplevel

  from engine.extract import extract  # pylint: disable=import-outside-toplevel
  from engine.models import get_adapter  # pylint: disable=import-outside-toplevel
  from engine.models.common import resolve_device  # pylint: disable=import-outside-toplevel
  datasets.disable_progress_bars()
  layers = parse_layers(FLAGS.layers)
  corpus = load_corpus()
  adapter = get_adapter(FLAGS.model, device=str(resolve_device(FLAGS.device)), dtype=FLAGS.model_dtype)
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
