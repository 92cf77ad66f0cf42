"""Several processes on loopback give the same scores as one; shares and exchange helpers."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
from absl.testing import absltest

from engine import distributed, svcca
from tests.test_svcca import structured_reps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import json, sys
import numpy as np
from engine import distributed, sharding
pid, count, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sharding.simulate_cpu_devices(2)
distributed.initialize(f"127.0.0.1:{port}", count, pid)
import jax
from engine import svcca
from tests.test_svcca import structured_reps
reps = structured_reps(seed=5, widths=(24, 40, 32, 40, 16, 28))
out = {"devices": jax.device_count(), "processes": jax.process_count()}
for metric in svcca.METRICS:
  out[metric] = svcca.pairwise(reps, metric=metric).tolist()
  # Each process computes the bases of its own share only; they are exchanged, then scored.
  mine = distributed.share(list(range(len(reps))))
  local = svcca.compute_bases([reps[i] for i in mine], metric=metric, warn=False)
  bases = distributed.gather_bases(local)
  pairs = svcca.all_pairs(len(reps))
  out[metric + "_shared"] = svcca.pair_scores(bases, pairs, metric=metric).score.tolist()
  # Process 0 owns every representation, the others none (more processes than languages).
  local = (svcca.compute_bases(reps, metric=metric, warn=False) if pid == 0 else
           distributed.no_bases(reps[0].shape[0], "float32", metric == "pwcca"))
  bases = distributed.gather_bases(local)
  out[metric + "_lopsided"] = svcca.pair_scores(bases, pairs, metric=metric).score.tolist()
out["json"] = distributed.allgather_json({"process": pid, "names": ["x"] * pid})
out["leader"] = distributed.broadcast_json(f"from {pid}")
print("RESULT " + json.dumps(out))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(count: int) -> list[dict]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, str(i), str(count), port], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(count)]
  results = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=300)
    finally:
      if p.poll() is None:
        p.kill()
    assert p.returncode == 0, err[-3000:]
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    results.append(json.loads(line[len("RESULT "):]))
  return results


class MultiProcessTest(absltest.TestCase):

  def test_two_processes_match_one(self):
    one, = _launch(1)
    two = _launch(2)
    self.assertEqual(one["processes"], 1)
    self.assertEqual([r["processes"] for r in two], [2, 2])
    self.assertEqual(two[0]["devices"], 4)  # the mesh spans both processes' devices
    for r in two:
      self.assertEqual(r["json"], [{"process": 0, "names": []}, {"process": 1, "names": ["x"]}])
      self.assertEqual(r["leader"], "from 0")
    reps = structured_reps(seed=5, widths=(24, 40, 32, 40, 16, 28))
    for metric in svcca.METRICS:
      for r in two:
        np.testing.assert_allclose(r[metric], one[metric], atol=1e-6, err_msg=metric)
        np.testing.assert_allclose(r[metric + "_shared"], one[metric + "_shared"], atol=1e-6,
                                   err_msg=metric)
        np.testing.assert_allclose(r[metric + "_lopsided"], one[metric + "_shared"], atol=1e-6,
                                   err_msg=metric)
      # The exchanged bases score the pairs like the full matrix does.
      pairs = svcca.all_pairs(len(reps))
      np.testing.assert_allclose(two[1][metric + "_shared"],
                                 np.asarray(one[metric])[pairs[:, 0], pairs[:, 1]], atol=1e-6)


class HelpersTest(absltest.TestCase):

  def test_share_covers_items_once_in_order(self):
    items = list(range(11))
    for count in (1, 2, 3, 4, 11, 12):
      shares = [distributed.share(items, i, count) for i in range(count)]
      self.assertEqual(sum(shares, []), items)
      sizes = [len(s) for s in shares]
      self.assertLessEqual(max(sizes) - min(sizes), 1)

  def test_single_process_is_a_no_op(self):
    self.assertFalse(distributed.initialize(auto=False))
    self.assertTrue(distributed.is_leader())
    x = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(distributed.allgather(x), x)
    self.assertEqual(distributed.agree(7), 7)

  def test_incomplete_flags_are_named(self):
    with self.assertRaisesRegex(ValueError, "missing num_processes, process_id"):
      distributed.initialize("127.0.0.1:1234")
    with self.assertRaisesRegex(ValueError, "process_id 2 is not in"):
      distributed.initialize("127.0.0.1:1234", 2, 2)


if __name__ == "__main__":
  absltest.main()
