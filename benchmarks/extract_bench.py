r"""Extraction throughput: sentences/s for text and speech, model through activation store.

  python -m benchmarks.extract_bench                    # seamless-tiny and seamless-mid
  python -m benchmarks.extract_bench --models=seamless-mid --sentences=128 --device=cuda
  python -m benchmarks.extract_bench --quick            # a smoke test in seconds

The corpus is one language of sentences from the bundled English text with synthetic speech
(a tone in noise) whose durations are drawn from --min_seconds..--max_seconds, so no speech
synthesis or download is timed. Every site and layer is pooled and written to a fresh store
(store writes are part of the time). A short warm-up extraction runs first. Writes JSON and a
markdown table under --out.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["seamless-tiny", "seamless-mid"], "Adapters to time.")
flags.DEFINE_integer("sentences", 64, "Sentences per modality.")
flags.DEFINE_integer("batch_size", 16, "Most sentences per batch.")
flags.DEFINE_float("min_seconds", 2.0, "Shortest synthetic utterance.")
flags.DEFINE_float("max_seconds", 10.0, "Longest synthetic utterance.")
flags.DEFINE_string("device", "auto", "cpu, cuda or auto.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Model dtype.")
flags.DEFINE_string("out", "benchmarks/results", "Output directory.")
flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke test of the whole benchmark.")


def make_corpus(n: int, min_seconds: float, max_seconds: float, seed: int = 0):
  """n English sentences (bundled text, cycled) with synthetic 16 kHz speech."""
  import datasets
  import numpy as np
  from engine.data import FEATURES
  from engine.data.bundled import read_bundled_text
  texts = list(read_bundled_text("eng").text.values())
  rng = np.random.default_rng(seed)
  rows = {name: [] for name in FEATURES}
  for i in range(n):
    seconds = rng.uniform(min_seconds, max_seconds)
    t = np.arange(int(16000 * seconds)) / 16000
    wave = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.02 * rng.standard_normal(t.size)
    rows["id"].append(i)
    rows["language"].append("eng")
    rows["text"].append(texts[i % len(texts)])
    rows["audio"].append(wave.astype(np.float32))
    rows["sampling_rate"].append(16000)
  return datasets.Dataset.from_dict(rows, features=FEATURES)


def bench_model(model: str, corpus, batch_size: int, device: str, dtype: str) -> list[dict]:
  import numpy as np
  import torch
  from engine.extract import extract
  from engine.models import get_adapter
  from engine.models.common import resolve_device
  device = str(resolve_device(device))
  t = time.perf_counter()
  adapter = get_adapter(model, device=device, dtype=dtype)
  build_s = time.perf_counter() - t
  params = sum(p.numel() for m in (getattr(adapter, "text_encoder", None),
                                   getattr(adapter, "speech_encoder", None)) if m is not None
               for p in m.parameters())
  lengths = np.array([len(a) for a in corpus["audio"]]) / 16000
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    extract(adapter, corpus.select(range(min(4, len(corpus)))), os.path.join(tmp, "warm"),
            batch_size=batch_size, progress=False)
    for modality in ("text", "speech"):
      if device.startswith("cuda"):
        torch.cuda.synchronize()
      t = time.perf_counter()
      report = extract(adapter, corpus, os.path.join(tmp, modality), modalities=[modality],
                       batch_size=batch_size, progress=False)
      wall = time.perf_counter() - t
      n = report.sentences[modality]
      rows.append({
          "model": model, "modality": modality, "device": device, "dtype": dtype,
          "params_m": round(params / 1e6, 1), "build_s": round(build_s, 2), "sentences": n,
          "batch_size": batch_size, "representations": len(report.completed),
          "wall_s": round(wall, 3), "sentences_per_s": round(n / wall, 2),
          "model_sentences_per_s": round(report.throughput(modality), 2),
          "audio_s": round(float(lengths.sum()), 1) if modality == "speech" else None,
          "realtime_x": round(float(lengths.sum()) / wall, 1) if modality == "speech" else None,
      })
  return rows


def markdown(rows: list[dict], machine: dict) -> str:
  head = ("| model | params (M) | modality | device | dtype | sentences | batch | representations "
          "| wall s | sentences/s (incl. store) | sentences/s (model + pooling) | x real time |")
  lines = [head, "|" + "---|" * 12]
  for r in rows:
    lines.append(f"| {r['model']} | {r['params_m']} | {r['modality']} | {r['device']} | "
                 f"{r['dtype']} | {r['sentences']} | {r['batch_size']} | {r['representations']} | "
                 f"{r['wall_s']:.2f} | {r['sentences_per_s']:.1f} | "
                 f"{r['model_sentences_per_s']:.1f} | {r['realtime_x'] or '-'} |")
  lines.append("")
  lines.append(f"Machine: {machine['cpu_count']} CPU cores ({machine['torch_threads']} torch "
               f"threads), {machine['platform']}, torch {machine['torch']}. Speech: synthetic "
               f"utterances of {machine['min_seconds']}-{machine['max_seconds']} s; x real time = "
               "seconds of audio extracted per second.")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  import torch
  import transformers
  n = 8 if FLAGS.quick else FLAGS.sentences
  lo, hi = (0.5, 2.0) if FLAGS.quick else (FLAGS.min_seconds, FLAGS.max_seconds)
  models = ["seamless-tiny"] if FLAGS.quick else FLAGS.models
  corpus = make_corpus(n, lo, hi)
  rows = []
  for model in models:
    rows += bench_model(model, corpus, FLAGS.batch_size, FLAGS.device, FLAGS.dtype)
    for r in rows[-2:]:
      print(f"{r['model']} {r['modality']}: {r['sentences_per_s']:.1f} sentences/s "
            f"({r['wall_s']:.2f} s for {r['sentences']})")
  machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "platform": platform.platform(), "torch": torch.__version__,
             "transformers": transformers.__version__, "min_seconds": lo, "max_seconds": hi}
  os.makedirs(FLAGS.out, exist_ok=True)
  stem = os.path.join(FLAGS.out, "extract_quick" if FLAGS.quick else "extract")
  with open(stem + ".json", "w", encoding="utf-8") as f:
    json.dump({"machine": machine, "rows": rows}, f, indent=1)
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write(markdown(rows, machine))
  print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
  app.run(main)
