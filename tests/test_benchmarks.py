"""`python -m benchmarks.svcca_bench --quick` end to end: its files, and kernel scores that the
NumPy google/svcca reference, recomputed here on the regenerated data, agrees with."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest

from benchmarks import baselines, google_svcca, svcca_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


class QuickBenchmarkTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.out = tempfile.mkdtemp(prefix="svcca_bench_")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.svcca_bench", "--quick",
                           f"--out={cls.out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(cls.out, "svcca_quick.json")) as f:
      cls.report = json.load(f)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.out, ignore_errors=True)
    super().tearDownClass()

  def test_writes_json_markdown_and_png(self):
    for ext in ("json", "md", "png"):
      path = os.path.join(self.out, f"svcca_quick.{ext}")
      self.assertGreater(os.path.getsize(path), 100, path)
    with open(os.path.join(self.out, "svcca_quick.png"), "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    with open(os.path.join(self.out, "svcca_quick.md")) as f:
      table = f.read()
    for heading in ("Paper-scale workloads", "Roofline", "Scaling in devices", "Where the time goes"):
      self.assertIn(heading, table)

  def test_kernel_scores_agree_with_recomputed_reference(self):
    meta, work = self.report["meta"], self.report["paper"][0]
    reps = svcca_bench.make_reps(work["R"], work["n"], work["d"], meta["data"])
    check = work["check"]
    self.assertNotEmpty(check["pairs"])
    for (i, j), kernel in zip(check["pairs"], check["kernel"]):
      reference = google_svcca.svcca(reps[i], reps[j], meta["threshold"])
      self.assertAlmostEqual(kernel, reference, delta=TOL)
      self.assertAlmostEqual(baselines.torch_svcca(reps[i], reps[j], meta["threshold"]),
                             reference, delta=TOL)
    for name in ("reference", "naive_jax", "torch"):
      self.assertLess(work["methods"][name]["max_abs_diff_vs_kernel"], TOL, name)

  def test_timings_and_roofline_are_filled_in(self):
    work = self.report["paper"][0]
    self.assertEqual(work["pairs"], work["R"] * (work["R"] - 1) // 2)
    for key in ("bases_s", "pairs_s", "compile_pairs_s", "pairs_gflops", "pairs_pct_gemm"):
      self.assertGreater(work[key], 0, key)
    self.assertGreater(self.report["meta"]["gemm_gflops"], 0)
    devices = {row["device_count"]: row for row in self.report["curves"]["devices"]}
    self.assertEqual(set(devices), {1, 2})
    self.assertNotIn("error", devices[2])
    self.assertEqual(devices[2]["jax_devices"], 2)
    # bases: float64 Gram eigendecompositions on CPU in float32, SVDs elsewhere
    self.assertTrue({"svd", "eigh"} & set(self.report["profile"]["bases"]["self_s"]))
    self.assertIn("svd", self.report["profile"]["pairs"]["self_s"])  # singular values of M


class QuickNullBenchmarkTest(absltest.TestCase):
  """`python -m benchmarks.null_bench --quick`: its files, throughputs that add up, and a null
  that agrees with the float64 computation the benchmark makes on its own."""

  def test_quick_run(self):
    out = tempfile.mkdtemp(prefix="null_bench_")
    self.addCleanup(shutil.rmtree, out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.null_bench", "--quick", "--repeats=1",
                           f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(out, "null_quick.json")) as f:
      report = json.load(f)
    with open(os.path.join(out, "null_quick.md")) as f:
      self.assertIn("Permutation-null throughput", f.read())
    by_metric = {w["metric"]: w for w in report["workloads"]}
    self.assertEqual(set(by_metric), {"svcca", "cka"})
    for w in by_metric.values():
      scored = w["pairs"] * w["permutations"]
      for part in ("calibrated", "null_only"):
        self.assertAlmostEqual(w[part]["per_s"] * w[part]["wall_s"], scored, delta=1e-6 * scored)
    svcca = by_metric["svcca"]
    self.assertGreater(svcca["spectrum_cpu_s"], 0)
    self.assertLess(svcca["max_abs_diff_null_mean"], 1e-5)
    self.assertLess(svcca["max_abs_diff_null_sd"], 1e-5)


if __name__ == "__main__":
  absltest.main()
