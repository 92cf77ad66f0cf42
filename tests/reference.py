"""Independent float64 NumPy references: the textbook algorithms, one pair at a time."""
from __future__ import annotations

import numpy as np


def kept_rank(s: np.ndarray, threshold: float) -> int:
  frac = np.cumsum(s**2) / np.sum(s**2)
  return int(np.searchsorted(frac, threshold) + 1) if threshold < 1 else int(np.sum(s > s[0] * 1e-12))


def reduce(x: np.ndarray, threshold: float) -> np.ndarray:
  """Centre, SVD, keep the directions explaining `threshold` of the squared-singular-value variance."""
  xc = np.asarray(x, np.float64)
  xc = xc - xc.mean(axis=0)
  u, s, vt = np.linalg.svd(xc, full_matrices=False)
  k = kept_rank(s, threshold)
  return xc @ vt[:k].T  # the data in its top-k singular directions: [n, k]


def canonical(xr: np.ndarray, yr: np.ndarray):
  """CCA via QR + SVD: canonical correlations and the canonical variates of x."""
  qx, _ = np.linalg.qr(xr - xr.mean(axis=0))
  qy, _ = np.linalg.qr(yr - yr.mean(axis=0))
  a, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
  m = min(xr.shape[1], yr.shape[1])
  return rho[:m], (qx @ a)[:, :m]


def svcca(x, y, threshold: float = 0.99) -> float:
  rho, _ = canonical(reduce(x, threshold), reduce(y, threshold))
  return float(np.mean(rho))


def pwcca(x, y, threshold: float = 0.99) -> float:
  """Morcos et al.: weights alpha_i = sum_j |<h_i, x_j>| over x's centred features."""
  rho, h = canonical(reduce(x, threshold), reduce(y, threshold))
  xc = np.asarray(x, np.float64) - np.mean(x, axis=0)
  alpha = np.abs(h.T @ xc).sum(axis=1)
  return float(np.sum(alpha * rho) / np.sum(alpha))


def linear_cka(x, y) -> float:
  xc = np.asarray(x, np.float64) - np.mean(x, axis=0)
  yc = np.asarray(y, np.float64) - np.mean(y, axis=0)
  return float(np.linalg.norm(yc.T @ xc) ** 2 /
               (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
  """Song et al. (2012), eq. 5: the unbiased HSIC estimator of two n x n kernel matrices."""
  n = k.shape[0]
  kt = k - np.diag(np.diag(k))
  lt = l - np.diag(np.diag(l))
  one = np.ones(n)
  return float((np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3)))


def cka_debiased(x, y) -> float:
  """Linear CKA with unbiased HSIC (Murphy et al. 2024). The estimator is invariant to shifting
  features; centring first only keeps a large offset from swamping the Gram in float64."""
  x = np.asarray(x, np.float64) - np.mean(x, axis=0)
  y = np.asarray(y, np.float64) - np.mean(y, axis=0)
  k, l = x @ x.T, y @ y.T
  return unbiased_hsic(k, l) / np.sqrt(unbiased_hsic(k, k) * unbiased_hsic(l, l))


def permutation_null(x, y, perms: np.ndarray, metric: str, threshold: float = 0.99) -> np.ndarray:
  """The metric of x against y with its sentences (rows) reordered by each permutation."""
  return np.array([METRICS[metric](x, y[p], threshold=threshold) for p in perms])


METRICS = {"svcca": svcca, "pwcca": pwcca, "cka": lambda x, y, threshold=None: linear_cka(x, y),
           "cka_debiased": lambda x, y, threshold=None: cka_debiased(x, y)}


def reduce_dims(x: np.ndarray, k: int) -> np.ndarray:
  """Centre, SVD, keep exactly the top k singular directions (fixed-dimension SVCCA)."""
  xc = np.asarray(x, np.float64)
  xc = xc - xc.mean(axis=0)
  _, _, vt = np.linalg.svd(xc, full_matrices=False)
  return xc @ vt[:k].T


# ---------------------------------------------------------------------------------------------
# BEATs (Chen et al. 2023) from the paper and Kaldi's documentation, float64, one frame / one
# position at a time where that is the plainer statement.


def kaldi_fbank(wave, num_bins: int = 128, rate: int = 16000) -> np.ndarray:
  """Kaldi compute-fbank-feats (25 ms / 10 ms, snip-edges, DC removal, pre-emphasis 0.97,
  Povey window, power spectrum at the next power of two, log of mel energies)."""
  wave = np.asarray(wave, np.float64)
  size, shift, n_fft = 400, 160, 512
  n_frames = 1 + (len(wave) - size) // shift
  hz_to_mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)
  lo, hi = hz_to_mel(20.0), hz_to_mel(rate / 2)
  step = (hi - lo) / (num_bins + 1)
  bin_mel = hz_to_mel(np.arange(n_fft // 2 + 1) * rate / n_fft)
  banks = np.zeros((num_bins, n_fft // 2 + 1))
  for m in range(num_bins):
    left, centre, right = lo + m * step, lo + (m + 1) * step, lo + (m + 2) * step
    for k in range(n_fft // 2):  # Kaldi leaves the Nyquist bin out
      if left < bin_mel[k] < right:
        banks[m, k] = ((bin_mel[k] - left) / (centre - left) if bin_mel[k] <= centre
                       else (right - bin_mel[k]) / (right - centre))
  n = np.arange(size)
  povey = (0.5 - 0.5 * np.cos(2 * np.pi * n / (size - 1))) ** 0.85
  out = np.zeros((n_frames, num_bins))
  for t in range(n_frames):
    frame = wave[t * shift: t * shift + size].copy()
    frame -= frame.mean()
    frame = frame - 0.97 * np.concatenate([frame[:1], frame[:-1]])
    spectrum = np.abs(np.fft.rfft(frame * povey, n_fft)) ** 2
    out[t] = np.log(np.maximum(banks @ spectrum, np.finfo(np.float32).eps))
  return out


def _layer_norm(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _gelu(x):
  from scipy.special import erf  # pylint: disable=import-outside-toplevel
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def t5_bucket(offset: int, num_buckets: int, max_distance: int) -> int:
  """Bidirectional T5 bucket of a key-minus-query offset."""
  half = num_buckets // 2
  exact = half // 2
  base = half if offset > 0 else 0
  d = abs(offset)
  if d < exact:
    return base + d
  far = exact + int(np.log(d / exact) / np.log(max_distance / exact) * (half - exact))
  return base + min(far, half - 1)


def beats_block(x, p: dict, heads: int, bias, alpha: float, pre_norm: bool = False):
  """One post-LN block with deep-norm residual weight `alpha` (or a pre-LN block) and the gated
  relative position bias: per head, scores_ij = q_i.k_j / sqrt(d) + g_i * r_ij with the GRU-style gate
  g_i = a_i (b_i w - 1) + 2, (a_i, b_i) = sigmoid of the grouped sums of a linear map of q_i.
  x [T, C]; p: numpy weights by our parameter names (without the 'encoder.layers.N.' prefix)."""
  t, c = x.shape
  d = c // heads
  lin = lambda y, name: y @ p[f"{name}.weight"].T + p[f"{name}.bias"]
  norm = lambda y, name: _layer_norm(y, p[f"{name}.weight"], p[f"{name}.bias"])
  h = norm(x, "self_attn_layer_norm") if pre_norm else x
  q, k, v = (lin(h, f"self_attn.{n}_proj") for n in "qkv")
  attn = np.zeros((t, c))
  for h in range(heads):
    qh, kh, vh = (y[:, h * d:(h + 1) * d] for y in (q, k, v))
    gate_in = lin(qh, "self_attn.grep_linear")  # [T, 8]
    update = 1 / (1 + np.exp(-gate_in[:, :4].sum(1)))
    reset = 1 / (1 + np.exp(-gate_in[:, 4:].sum(1)))
    gate = update * (reset * p["self_attn.grep_a"].reshape(-1)[h] - 1.0) + 2.0
    scores = qh @ kh.T / np.sqrt(d) + gate[:, None] * bias[h]
    weights = np.exp(scores - scores.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    attn[:, h * d:(h + 1) * d] = weights @ vh
  if pre_norm:
    x = x + lin(attn, "self_attn.out_proj")
    return x + lin(_gelu(lin(norm(x, "final_layer_norm"), "fc1")), "fc2")
  x = norm(x * alpha + lin(attn, "self_attn.out_proj"), "self_attn_layer_norm")
  return norm(x * alpha + lin(_gelu(lin(x, "fc1")), "fc2"), "final_layer_norm")


def beats_encoder(fbank, p: dict, cfg) -> list[np.ndarray]:
  """BEATs on one normalised fbank [frames, 128]: [encoder input, each block], the last one
  after the final LayerNorm for a pre-LN model."""
  size = cfg.input_patch_size
  w = p["patch_embedding.weight"]  # [E, 1, P, P]
  rows, cols = fbank.shape[0] // size, fbank.shape[1] // size
  tokens = np.array([(fbank[i * size:(i + 1) * size, j * size:(j + 1) * size] * w[:, 0]).sum((1, 2))
                     for i in range(rows) for j in range(cols)])  # time-major patches
  x = _layer_norm(tokens, p["layer_norm.weight"], p["layer_norm.bias"])
  x = x @ p["post_extract_proj.weight"].T + p["post_extract_proj.bias"]
  g, v = p["encoder.pos_conv.weight_g"], p["encoder.pos_conv.weight_v"]  # [1,1,K], [C, C/G, K]
  kernel_w = v * g / np.sqrt((v ** 2).sum((0, 1), keepdims=True))
  n, c = x.shape
  k, groups = cfg.conv_pos, cfg.conv_pos_groups
  per = c // groups
  padded = np.concatenate([np.zeros((k // 2, c)), x, np.zeros((k // 2, c))])
  conv = np.zeros((n, c))
  for o in range(c):
    group = o // per
    for t in range(n):
      window = padded[t:t + k, group * per:(group + 1) * per]  # [K, C/G]
      conv[t, o] = (window * kernel_w[o].T).sum() + p["encoder.pos_conv.bias"][o]
  final = lambda y: _layer_norm(y, p["encoder.layer_norm.weight"], p["encoder.layer_norm.bias"])
  x = x + _gelu(conv) if cfg.layer_norm_first else final(x + _gelu(conv))
  table = p["encoder.layers.0.self_attn.relative_attention_bias.weight"]  # [buckets, H]
  bias = np.array([[[table[t5_bucket(j - i, cfg.num_buckets, cfg.max_distance), h]
                     for j in range(n)] for i in range(n)] for h in range(cfg.encoder_attention_heads)])
  alpha = (2 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0
  states = [x]
  for layer in range(cfg.encoder_layers):
    prefix = f"encoder.layers.{layer}."
    block = {key[len(prefix):]: val for key, val in p.items() if key.startswith(prefix)}
    states.append(beats_block(states[-1], block, cfg.encoder_attention_heads, bias, alpha,
                              cfg.layer_norm_first))
  if cfg.layer_norm_first:
    states[-1] = final(states[-1])
  return states
