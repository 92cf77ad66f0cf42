"""The sweep's bucketed chunk shapes: padding representations, kept directions and pairs changes
no score, rank or null statistic, and the padding pairs are dropped."""
import numpy as np
import pytest

from engine import null, scoring, svcca


def _bases(metric):
  rng = np.random.default_rng(3)
  n = 24
  # different ranks, so the joined width is neither a multiple of 32 nor every rank
  reps = [rng.standard_normal((n, 4)) @ rng.standard_normal((4, 10 + i)) +
          0.3 * rng.standard_normal((n, 10 + i)) * (i % 2) for i in range(7)]
  return svcca.compute_bases(reps, metric=metric, threshold=0.95, warn=False), n


def test_bucketed_shapes_are_buckets_and_keep_the_real_pairs_first(monkeypatch):
  monkeypatch.setattr(scoring, "WIDTH_STEP", 32)
  bases, _ = _bases("svcca")
  assert bases.u.shape[-1] % 32
  idx = svcca.all_pairs(7)[:19]
  padded, pidx = scoring.bucketed(bases, idx)
  assert padded.u.shape[0] == 8 and padded.u.shape[-1] % scoring.WIDTH_STEP == 0
  assert len(pidx) == 32
  np.testing.assert_array_equal(pidx[:19], idx)
  assert not pidx[19:].any()
  np.testing.assert_array_equal(np.asarray(padded.u)[:7, :, :bases.u.shape[-1]], bases.u)
  assert not np.asarray(padded.u)[7:].any()
  assert not np.asarray(padded.u)[:, :, bases.u.shape[-1]:].any()


@pytest.mark.parametrize("metric", ["svcca", "pwcca", "cka"])
def test_chunk_scores_equal_unpadded_pair_scores_and_null(metric, monkeypatch):
  monkeypatch.setattr(scoring, "PAIR_BLOCK", 8)  # several blocks and a padded last one
  monkeypatch.setattr(scoring, "WIDTH_STEP", 32)  # padded kept directions
  bases, n = _bases(metric)
  idx = svcca.all_pairs(7)
  perms = null.permutations(n, 20, 0)
  result, chance = scoring.chunk_scores(bases, idx, metric=metric, perms=perms, mesh=None)
  plain = svcca.pair_scores(bases, idx, metric=metric)
  plain_null = null.pair_null(bases, idx, perms, metric=metric)
  assert len(result.score) == len(idx) == len(chance.null_mean)
  np.testing.assert_allclose(result.score, plain.score, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(result.rank_a, plain.rank_a)
  np.testing.assert_array_equal(result.rank_b, plain.rank_b)
  np.testing.assert_allclose(chance.null_mean, plain_null.null_mean, rtol=0, atol=1e-6)
  np.testing.assert_allclose(chance.null_sd, plain_null.null_sd, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(chance.exceed, plain_null.exceed)
