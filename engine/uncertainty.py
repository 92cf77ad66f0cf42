"""Confidence intervals for the findings: a bootstrap over languages, and one over sentences.

Languages: the table is resampled by language (with replacement) and each finding recomputed
from the resampled languages' rows; `scipy.stats.bootstrap` does the resampling and the BCa
interval over language *indices*, so any finding that can be written as a function of a set of
languages gets an interval. A language drawn twice counts twice in per-language means; in
cross-lingual means the pairs of a resample are all pairs of draws of two different languages.

The interval is Hesterberg's *expanded percentile* interval (T. Hesterberg, "What Teachers
Should Know About the Bootstrap", The American Statistician 69(4), 2015): scipy's percentile
interval at a level widened so that, for the mean of n normal values, it is as wide as the t
interval, 1 - alpha' with alpha'/2 = Phi(-sqrt(n / (n - 1)) t_{n-1, 1-alpha/2}). Plain
percentile and BCa intervals are too narrow at the 20-30 languages a study has (their
coverage of a mean is ~93.5% at n = 30, and lower below); the expanded one covers at the
nominal rate (checked in simulation by tests/test_uncertainty.py). `method` also takes
scipy's 'percentile', 'basic' and 'BCa'.

Sentences (`--bootstrap=B`): the sentences are resampled with replacement and every planned pair
re-scored from the same activations, bases recomputed per replicate, so the interval covers the
sentence-sampling spread of every score at once. Duplicated rows are fine for SVCCA, PWCCA and
CKA: centring and the SVD treat a row drawn k times as a row of weight k, so a replicate is a
weighted version of the same comparison. A replicate has fewer distinct sentences (about 63%),
which raises its scores and its chance level alike; replicates subtract the observed null, so
raw-score findings drift upwards across replicates (on the default run the cross-modal slope's
replicates centre ~0.005 above the estimate). The records say so: `sentence_bias` is the mean
replicate minus the estimate, and an interval that misses the estimate by about that much
reflects this drift, not the sentence spread.
"""
from __future__ import annotations

import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
import scipy.stats

METHOD = "expanded percentile"
RESAMPLES = 999
CONFIDENCE = 0.95
SEED = 0
MIN_LANGUAGES = 3  # fewer gives no interval


def expanded_level(confidence: float, n: int) -> float:
  """The percentile level of Hesterberg's expanded percentile interval for n values."""
  alpha = 1 - confidence
  t = scipy.stats.t.ppf(1 - alpha / 2, n - 1)
  return float(1 - 2 * scipy.stats.norm.cdf(-np.sqrt(n / (n - 1)) * t))


def language_interval(statistic: Callable[[np.ndarray], np.ndarray], n: int, *,
                      resamples: int = RESAMPLES, seed: int = SEED,
                      confidence: float = CONFIDENCE, method: str = METHOD
                      ) -> tuple[float, float]:
  """The bootstrap interval of `statistic` over `n` languages.

  statistic: int language indices [..., k] -> values [...] (one value per resample; it must
  accept any leading shape and any k, as the jackknife of BCa calls it with k = n - 1).
  (nan, nan) for fewer than MIN_LANGUAGES languages or a non-finite estimate.
  """
  if n < MIN_LANGUAGES:
    return float("nan"), float("nan")
  full = float(statistic(np.arange(n)))
  if not np.isfinite(full):
    return float("nan"), float("nan")

  def stat(idx, axis=-1):
    return statistic(np.moveaxis(np.asarray(idx), axis, -1).astype(np.int64))

  level, scipy_method = confidence, method
  if method == "expanded percentile":
    level, scipy_method = expanded_level(confidence, n), "percentile"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a constant statistic (DegenerateDataWarning) is handled
    result = scipy.stats.bootstrap((np.arange(n),), stat, vectorized=True, axis=-1,
                                   n_resamples=resamples, confidence_level=level,
                                   method=scipy_method, random_state=np.random.default_rng(seed))
  low, high = (float(v) for v in result.confidence_interval)
  if not (np.isfinite(low) and np.isfinite(high)):
    spread = result.bootstrap_distribution
    finite = spread[np.isfinite(spread)]
    if finite.size and np.ptp(finite) <= 1e-12 * max(1.0, abs(full)):
      return full, full  # every resample gives the same value
    if finite.size >= 0.9 * spread.size:
      # With a handful of languages some resamples draw one language only, where a
      # cross-lingual mean is undefined: the percentile interval of the others.
      tail = 100 * (1 - level) / 2
      return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))
  return low, high


# ----------------------------------------------------------------------------- resampled means


def vector_mean(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """Mean over the resampled languages of per-language values [L] (NaN: language absent)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.nanmean(values[idx], axis=-1)


def layer_means(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """Per-layer means [..., T] over resampled languages of per-language values [L, T]."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.nanmean(values[idx], axis=-2)


def counts(idx: np.ndarray, size: int) -> np.ndarray:
  """How often each of `size` languages is drawn: int indices [..., k] -> counts [..., size]."""
  lead = idx.shape[:-1]
  flat = idx.reshape(-1, idx.shape[-1])
  offsets = (np.arange(len(flat)) * size)[:, None]
  out = np.bincount((flat + offsets).ravel(), minlength=len(flat) * size)
  return out.reshape(lead + (size,)).astype(np.float64)


def pair_mean(matrix: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """Mean over pairs of resampled languages of a language x language matrix [L, L].

  Pairs of two draws of one language are left out (a language is not compared with itself);
  NaN entries (pairs not scored) are skipped. A pair of languages drawn w_i and w_j times
  counts w_i * w_j times, so the mean is a quadratic form in the draw counts.
  """
  matrix = np.asarray(matrix, np.float64)
  scored = np.isfinite(matrix)
  np.fill_diagonal(scored, False)
  values = np.where(scored, matrix, 0.0)
  w = counts(idx, len(matrix))
  total = np.einsum("...i,ij,...j->...", w, values, w)
  weight = np.einsum("...i,ij,...j->...", w, scored.astype(np.float64), w)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(weight > 0, total / np.where(weight > 0, weight, 1), np.nan)


def slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Least-squares slope of y [..., T] on x [T], skipping NaN entries of y."""
  x = np.broadcast_to(np.asarray(x, np.float64), y.shape)
  ok = np.isfinite(y)
  count = ok.sum(-1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    xm = np.where(ok, x, 0).sum(-1) / count
    ym = np.where(ok, y, 0).sum(-1) / count
    dx = np.where(ok, x - xm[..., None], 0)
    dy = np.where(ok, y - ym[..., None], 0)
    out = (dx * dy).sum(-1) / (dx * dx).sum(-1)
  return np.where(count >= 2, out, np.nan)


# ----------------------------------------------------------------------------- sentences


def sentence_intervals(estimate: Callable[[np.ndarray], Mapping[str, float]], n: int, *,
                       replicates: int, seed: int = SEED, confidence: float = CONFIDENCE
                       ) -> dict[str, tuple[float, float, float]]:
  """Percentile intervals of named estimates over `replicates` resamples of n sentences.

  estimate: sentence rows [n] (drawn with replacement) -> {name: value}, recomputing every
  score from those rows. Returns {name: (low, high, mean of the replicates)}.
  """
  if replicates < 2:
    raise ValueError(f"--bootstrap needs at least 2 replicates, got {replicates}")
  if n < 2:
    raise ValueError(f"a sentence bootstrap needs at least 2 sentences, got {n}")
  rng = np.random.default_rng(seed)
  draws: dict[str, list[float]] = {}
  for _ in range(replicates):
    for name, value in estimate(rng.integers(0, n, n)).items():
      draws.setdefault(name, []).append(float(value))
  tail = 100 * (1 - confidence) / 2
  out = {}
  for name, values in draws.items():
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    out[name] = ((float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)),
                  float(values.mean()))
                 if len(values) >= 2 else (float("nan"),) * 3)
  return out


def plan_rescorer(load: Callable[[object], np.ndarray], plan: Sequence, *, metric: str = "svcca",
                  threshold: float = 0.99, dims: int | None = None, dtype: str | None = None,
                  mesh=None) -> Callable[[np.ndarray], np.ndarray]:
  """rows -> the plan's [P] scores recomputed on those sentence rows (bases per call).

  load(key) -> [n, d] activations of a representation of the plan (called once per key).
  threshold, dims, dtype: as the sweep keeps directions (--threshold, --svd_dims) and runs the
  kernel (--kernel_dtype); mesh: the pair mesh (default one device).
  """
  from engine import pairs as pairs_lib  # pylint: disable=import-outside-toplevel
  from engine import svcca  # pylint: disable=import-outside-toplevel
  keys = pairs_lib.plan_keys(plan)
  index = pairs_lib.index_pairs(plan, keys)
  reps = [np.asarray(load(k)) for k in keys]

  def rescore(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    bases = svcca.compute_bases([r[rows] for r in reps], metric=metric, threshold=threshold,
                                warn=False, dims=dims, dtype=dtype)
    return svcca.pair_scores(bases, index, metric=metric, mesh=mesh).score

  return rescore
