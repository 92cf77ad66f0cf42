r"""Soak run: thousands of pairs scored chunk by chunk, resident memory at start and end.

  python -m benchmarks.soak                         # kernel soak, then a cli.sweep soak
  python -m benchmarks.soak --pairs=100000 --sweep_rounds=0
  python -m benchmarks.soak --quick                 # a smoke test in seconds

Kernel soak: --representations synthetic representations are written to an activation store;
then --pairs pairs (all pairs, round after round) are scored through engine.svcca.pair_scores
in chunks of --chunk_pairs. Every --rebase_every chunks the bases are recomputed from the
store's memory maps, as a sweep does per place, so allocation churn is part of the soak.
Memory is the process's resident set (VmRSS), sampled after every chunk: after the first
(everything compiled), after a --warmup share of the chunks (allocator pools grow in steps at
first, then hold), and at the end. Growth after the warm-up is the leak figure.

Sweep soak: a seamless-tiny sweep on the bundled corpus with the 'all' plan, then its pair
stage rescored from the stored activations --sweep_rounds times in the same process
(checkpoints removed between rounds): RSS after each round.

Writes JSON and a markdown table under --out.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("pairs", 60000, "Pairs to score in the kernel soak.")
flags.DEFINE_float("warmup", 0.25, "Share of the kernel soak's chunks counted as warm-up.")
flags.DEFINE_integer("representations", 160, "Synthetic representations in the kernel soak.")
flags.DEFINE_integer("n", 200, "Sentences per representation.")
flags.DEFINE_integer("d", 64, "Features per representation.")
flags.DEFINE_integer("chunk_pairs", 256, "Pairs per pair_scores call.")
flags.DEFINE_integer("rebase_every", 8, "Recompute bases from the store every this many chunks.")
flags.DEFINE_enum("metric", "svcca", ["svcca", "pwcca", "cka"], "Similarity measure.")
flags.DEFINE_integer("sweep_rounds", 5, "Pair-stage rounds of the sweep soak (0: skip it).")
flags.DEFINE_list("sweep_languages", ["eng", "deu", "fra", "spa", "por", "rus", "cmn", "jpn", "kor",
                                     "arb", "hin", "ben"], "Languages of the sweep soak.")
flags.DEFINE_integer("sweep_sentences", 24, "Sentences of the sweep soak.")
flags.DEFINE_integer("sweep_chunk_pairs", 64, "Pairs per checkpointed chunk in the sweep soak.")
flags.DEFINE_string("out", "benchmarks/results", "Output directory for soak.json / soak.md.")
flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke test of the whole soak.")

MIB = 1 << 20


def rss() -> int:
  """Resident set size of this process in bytes (Linux /proc, else psutil)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  import psutil  # pylint: disable=import-outside-toplevel
  return psutil.Process().memory_info().rss


def _reps(r: int, n: int, d: int, seed: int = 0):
  """Representations sharing a latent signal, each with its own mixing and noise."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((n, 16))
  for i in range(r):
    mix = rng.standard_normal((16, d))
    yield (z @ mix + (0.5 + i % 7 * 0.2) * rng.standard_normal((n, d))).astype(np.float32)


def kernel_soak(pairs: int, r: int, n: int, d: int, chunk: int, rebase_every: int,
                metric: str, warmup: float) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from engine import svcca  # pylint: disable=import-outside-toplevel
  from engine.store import Key, Store  # pylint: disable=import-outside-toplevel
  root = tempfile.mkdtemp(prefix="xmodal-soak-")
  try:
    keys = [Key("syn", "text", "site", i) for i in range(r)]
    with Store.open(root, {"ids": list(range(n)), "model": "synthetic"}) as st:
      for key, x in zip(keys, _reps(r, n, d)):
        w = st.begin(key, d)
        w.write(np.arange(n), x)
        st.finish([w])
    store = Store.open(root, mode="r")

    def bases():
      return svcca.compute_bases([store.load(k) for k in keys], metric=metric, warn=False)

    everything = svcca.all_pairs(r)
    chunks = -(-pairs // chunk)
    samples, scored, checksum = [], 0, 0.0
    start = time.perf_counter()
    b = bases()
    for c in range(chunks):
      at = (np.arange(chunk) + c * chunk) % len(everything)
      if c and c % rebase_every == 0:
        b = bases()
      result = svcca.pair_scores(b, everything[at], metric=metric)
      checksum += float(result.score.sum())
      scored += len(at)
      if c == 0:
        warm, warm_time = rss(), time.perf_counter()
      samples.append(rss())
    seconds = time.perf_counter() - warm_time
    end = rss()
    settled = samples[min(len(samples) - 1, int(warmup * len(samples)))]
    half = len(samples) // 2
    return {"pairs": scored, "chunks": chunks, "representations": r, "n": n, "d": d,
            "chunk_pairs": chunk, "metric": metric, "rebase_every": rebase_every,
            "rss_after_first_chunk_mib": warm / MIB, "rss_after_warmup_mib": settled / MIB,
            "rss_end_mib": end / MIB, "rss_peak_mib": max(samples) / MIB,
            "growth_during_warmup_mib": (settled - warm) / MIB,
            "growth_after_warmup_mib": (end - settled) / MIB,
            "peak_second_half_minus_first_half_mib": (max(samples[half:])
                                                      - max(samples[:half])) / MIB,
            "rss_per_chunk_mib": [round(x / MIB, 1) for x in samples],
            "seconds_after_first_chunk": seconds, "pairs_per_second": (scored - chunk) / seconds,
            "first_chunk_seconds": warm_time - start, "mean_score": checksum / scored}
  finally:
    shutil.rmtree(root, ignore_errors=True)


def sweep_soak(rounds: int, languages: list[str], sentences: int, chunk: int) -> dict:
  from engine import sweep as S  # pylint: disable=import-outside-toplevel
  root = tempfile.mkdtemp(prefix="xmodal-soak-sweep-")
  out = os.path.join(root, "sweep")
  config = S.SweepConfig(languages=tuple(languages), max_sentences=sentences, plan="all",
                         chunk_pairs=chunk, output_dir=out, progress=False)
  try:
    start = time.perf_counter()
    first = S.run_sweep(config, log=lambda line: None)
    after = [rss()]
    times = [time.perf_counter() - start]
    for _ in range(rounds):
      shutil.rmtree(os.path.join(out, S.CHECKPOINT_DIR))
      start = time.perf_counter()
      result = S.run_sweep(config, log=lambda line: None)
      assert result.chunks_run == result.chunks and result.table.equals(first.table)
      after.append(rss())
      times.append(time.perf_counter() - start)
    return {"pairs_per_round": len(first.table), "chunks_per_round": first.chunks,
            "rounds": rounds, "languages": languages, "sentences": sentences,
            "chunk_pairs": chunk, "rss_after_round_mib": [a / MIB for a in after],
            "growth_mib": (after[-1] - after[1]) / MIB if rounds else 0.0,
            "seconds_per_round": times}
  finally:
    shutil.rmtree(root, ignore_errors=True)


def markdown(result: dict) -> str:
  k = result["kernel"]
  lines = ["# Soak run", "", f"{result['machine']}", "",
           "| stage | pairs | RSS start (MiB) | after warm-up (MiB) | end (MiB) | peak (MiB) "
           "| growth after warm-up (MiB) |",
           "|---|---:|---:|---:|---:|---:|---:|",
           f"| kernel: pair_scores in chunks of {k['chunk_pairs']}, bases every "
           f"{k['rebase_every']} chunks ({k['representations']} reps, n={k['n']}, d={k['d']}) "
           f"| {k['pairs']} | {k['rss_after_first_chunk_mib']:.1f} | "
           f"{k['rss_after_warmup_mib']:.1f} | {k['rss_end_mib']:.1f} | "
           f"{k['rss_peak_mib']:.1f} | {k['growth_after_warmup_mib']:+.1f} |"]
  s = result.get("sweep")
  if s:
    r = s["rss_after_round_mib"]
    lines.append(f"| cli.sweep pair stage rescored {s['rounds']}x ('all' plan, "
                 f"{len(s['languages'])} languages, chunks of {s['chunk_pairs']}) | "
                 f"{s['pairs_per_round'] * s['rounds']} | {r[0]:.1f} | {r[1]:.1f} | {r[-1]:.1f} "
                 f"| {max(r):.1f} | {s['growth_mib']:+.1f} |")
  lines += ["", f"Kernel: {k['growth_during_warmup_mib']:+.1f} MiB during the warm-up (first "
            f"{FLAGS.warmup:.0%} of chunks; allocator pools grow in steps, then hold); highest "
            f"RSS of the second half minus the first: "
            f"{k['peak_second_half_minus_first_half_mib']:+.1f} MiB; "
            f"{k['pairs_per_second']:.0f} pairs/s after the first chunk. Sweep: RSS after the "
            "first run (extraction and scoring), then after each rescoring round."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if FLAGS.quick:
    FLAGS.pairs, FLAGS.representations, FLAGS.n, FLAGS.d = 512, 24, 64, 16
    FLAGS.chunk_pairs, FLAGS.sweep_rounds, FLAGS.sweep_sentences = 64, 1, 6
    FLAGS.sweep_languages = ["eng", "deu"]
  import jax  # pylint: disable=import-outside-toplevel
  result = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, {jax.default_backend()}",
            "rss_at_start_mib": rss() / MIB}
  result["kernel"] = kernel_soak(FLAGS.pairs, FLAGS.representations, FLAGS.n, FLAGS.d,
                                 FLAGS.chunk_pairs, FLAGS.rebase_every, FLAGS.metric,
                                 FLAGS.warmup)
  print(json.dumps({k: v for k, v in result["kernel"].items() if k != "rss_per_chunk_mib"},
                   indent=1))
  if FLAGS.sweep_rounds:
    result["sweep"] = sweep_soak(FLAGS.sweep_rounds, FLAGS.sweep_languages,
                                 FLAGS.sweep_sentences, FLAGS.sweep_chunk_pairs)
    print(json.dumps(result["sweep"], indent=1))
  os.makedirs(FLAGS.out, exist_ok=True)
  name = "soak_quick" if FLAGS.quick else "soak"
  with open(os.path.join(FLAGS.out, f"{name}.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(FLAGS.out, f"{name}.md"), "w", encoding="utf-8") as f:
    f.write(markdown(result))
  print(markdown(result))


if __name__ == "__main__":
  app.run(main)
