"""BEATs (Chen et al., ICML 2023), the audio encoder SALMONN reads next to Whisper.

The iter3+ model: a 128-bin Kaldi log-mel fbank (25 ms / 10 ms frames) of the waveform scaled
to 16-bit range, normalised as (fbank - 15.41663) / (2 * 6.55582); 16x16 patches of it embedded
by a convolution (time-major: each 160 ms time patch gives 8 frequency-band tokens, so 50
tokens per second, Whisper's rate); LayerNorm, a projection to the encoder width, a
weight-normed grouped convolution as positional embedding, then post-LN ("deep norm")
Transformer blocks whose attention adds a bucketed relative position bias (shared by every
block) scaled per query by a learned GRU-style gate (the gated relative position bias of
WavLM). Written from the paper and its public code; the released checkpoint's `cfg` dict
configures it (see `convert_beats`).

Hidden states follow transformers' `output_hidden_states` convention: index 0 is the encoder
input (after the positional convolution and, post-LN, its LayerNorm), index l the output of
block l, the last one the encoder output (after the final LayerNorm for a pre-LN model).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

SAMPLING_RATE = 16000
MEL_BINS = 128
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
WAVE_SCALE = 2 ** 15
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
# Kaldi's floor on filterbank energies: numeric_limits<float>::epsilon().
ENERGY_FLOOR = float(torch.finfo(torch.float32).eps)
# The attention's stabilising scale: queries are divided by it before q.k and the shifted
# scores multiplied back (softmax-invariant, it only keeps float16 scores in range).
ATTENTION_ALPHA = 32.0
ACTIVATIONS = ("gelu", "gelu_accurate", "relu")


@dataclasses.dataclass(frozen=True)
class BeatsConfig:
  """The architecture fields of BEATs' `BEATsConfig`, with its defaults (a checkpoint's `cfg`
  overrides them). Training-only fields (dropouts, layer drop, gradient decay) are not kept."""
  input_patch_size: int = -1
  embed_dim: int = 512
  conv_bias: bool = False
  encoder_layers: int = 12
  encoder_embed_dim: int = 768
  encoder_ffn_embed_dim: int = 3072
  encoder_attention_heads: int = 12
  activation_fn: str = "gelu"
  layer_norm_first: bool = False
  deep_norm: bool = False
  conv_pos: int = 128
  conv_pos_groups: int = 16
  relative_position_embedding: bool = False
  num_buckets: int = 320
  max_distance: int = 1280
  gru_rel_pos: bool = False
  finetuned_model: bool = False
  predictor_class: int = 527

  def __post_init__(self):
    if self.input_patch_size <= 0:
      raise ValueError(f"BEATs input_patch_size={self.input_patch_size}; a checkpoint's cfg "
                       "must give the patch size (16 for the released models)")
    if self.activation_fn not in ACTIVATIONS:
      raise ValueError(f"BEATs activation_fn {self.activation_fn!r} is not supported; "
                       f"choose one of {ACTIVATIONS}")
    if self.deep_norm and self.layer_norm_first:
      raise ValueError("BEATs cfg sets both deep_norm and layer_norm_first; BEATs allows one")
    if self.encoder_embed_dim % self.encoder_attention_heads:
      raise ValueError(f"BEATs encoder_embed_dim={self.encoder_embed_dim} is not divisible by "
                       f"encoder_attention_heads={self.encoder_attention_heads}")

  @classmethod
  def from_cfg(cls, cfg: Mapping) -> "BeatsConfig":
    """A checkpoint's `cfg` dict (or a config object's __dict__) -> config; extra keys ignored."""
    cfg = dict(cfg if isinstance(cfg, Mapping) else vars(cfg))
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names})

  @property
  def head_dim(self) -> int:
    return self.encoder_embed_dim // self.encoder_attention_heads

  @property
  def deep_norm_alpha(self) -> float:
    return (2 * self.encoder_layers) ** 0.25 if self.deep_norm else 1.0


# ---------------------------------------------------------------------------------------------
# Front end: Kaldi's compute-fbank-feats with BEATs' options, in torch ops.


def mel_banks(num_bins: int = MEL_BINS, fft_size: int = 512, sample_rate: float = SAMPLING_RATE,
              low_freq: float = LOW_FREQ) -> torch.Tensor:
  """Kaldi's triangular filters on the mel scale 1127 ln(1 + f/700), [num_bins, fft_size//2 + 1]
  (the Nyquist bin gets zero weight, as in Kaldi), in float32 as torchaudio computes them."""
  high_freq = 0.5 * sample_rate
  mel_low, mel_high = _mel(low_freq), _mel(high_freq)
  delta = (mel_high - mel_low) / (num_bins + 1)
  index = torch.arange(num_bins, dtype=torch.float32)[:, None]
  left, centre, right = (mel_low + (index + k) * delta for k in (0.0, 1.0, 2.0))
  freqs = _mel(sample_rate / fft_size * torch.arange(fft_size // 2, dtype=torch.float32))[None]
  up = (freqs - left) / (centre - left)
  down = (right - freqs) / (right - centre)
  banks = torch.clamp(torch.minimum(up, down), min=0.0)
  return F.pad(banks, (0, 1))


def _mel(freq):
  log = torch.log if torch.is_tensor(freq) else math.log
  return 1127.0 * log(1.0 + freq / 700.0)


def kaldi_fbank(wave: torch.Tensor, num_mel_bins: int = MEL_BINS,
                sample_rate: int = SAMPLING_RATE) -> torch.Tensor:
  """Log-mel filterbank of one waveform [S] -> [frames, num_mel_bins], Kaldi's defaults as
  BEATs uses them: snip_edges (frames = 1 + (S - 400) // 160), no dither, per-frame DC removal,
  pre-emphasis 0.97, Povey window, 512-point power spectrum, energies floored at float eps.
  Computed in float32 (BEATs' precision) unless the waveform is float64."""
  window = int(sample_rate * FRAME_LENGTH_MS / 1000)
  shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
  if wave.dim() != 1 or wave.shape[0] < window:
    raise ValueError(f"BEATs fbank needs a 1-D waveform of at least {window} samples; "
                     f"got shape {tuple(wave.shape)}")
  fft_size = 1 << (window - 1).bit_length()
  frames = (wave if wave.dtype == torch.float64 else wave.float()).unfold(0, window, shift)
  frames = frames - frames.mean(dim=1, keepdim=True)
  previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
  frames = frames - PREEMPHASIS * previous
  hann = torch.hann_window(window, periodic=False, dtype=frames.dtype, device=frames.device)
  povey = hann ** 0.85
  frames = F.pad(frames * povey, (0, fft_size - window))
  power = torch.fft.rfft(frames).abs() ** 2
  banks = mel_banks(num_mel_bins, fft_size, sample_rate).to(frames.device, frames.dtype)
  energies = power @ banks.T
  return torch.clamp(energies, min=ENERGY_FLOOR).log()


def preprocess(waves: torch.Tensor) -> torch.Tensor:
  """[B, S] waveforms in [-1, 1] -> [B, frames, 128] normalised fbank (float32)."""
  fbank = torch.stack([kaldi_fbank(w * WAVE_SCALE) for w in waves])
  return (fbank - FBANK_MEAN) / (2 * FBANK_STD)


def tokens_for(samples: int, patch: int = 16) -> int:
  """BEATs tokens of a `samples`-long waveform: fbank frames // patch * (128 // patch)."""
  frames = 1 + (samples - 400) // 160 if samples >= 400 else 0
  return frames // patch * (MEL_BINS // patch)


# ---------------------------------------------------------------------------------------------
# Encoder.


def relative_buckets(length: int, num_buckets: int, max_distance: int,
                     device=None) -> torch.Tensor:
  """[length, length] bucket of each (query i, key j) offset j - i: half the buckets per
  direction, exact below num_buckets // 4, log-spaced up to max_distance, then saturated."""
  position = torch.arange(length, dtype=torch.long, device=device)
  offset = position[None, :] - position[:, None]
  half = num_buckets // 2
  exact = half // 2
  distance = offset.abs()
  far = exact + (torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                 * (half - exact)).to(torch.long)
  far = torch.clamp(far, max=half - 1)
  return (offset > 0).long() * half + torch.where(distance < exact, distance, far)


class GatedRelativeAttention(nn.Module):
  """Multi-head self-attention + relative position bias, gated per query when `gated`."""

  def __init__(self, cfg: BeatsConfig, owns_bias: bool):
    super().__init__()
    dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
    self.heads, self.head_dim = heads, cfg.head_dim
    self.scaling = self.head_dim ** -0.5
    self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
    self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
    self.gated = cfg.relative_position_embedding and cfg.gru_rel_pos
    if owns_bias:
      self.relative_attention_bias = nn.Embedding(cfg.num_buckets, heads)
    if self.gated:
      self.grep_linear = nn.Linear(self.head_dim, 8)
      self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

  def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
              padding: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, C]; bias [H, T, T] or None; padding [B, T] (True = padding) or None."""
    b, t, c = x.shape
    split = lambda y: y.view(b, t, self.heads, self.head_dim).transpose(1, 2)
    query = split(self.q_proj(x))
    key, value = split(self.k_proj(x)), split(self.v_proj(x))
    scores = (query * self.scaling / ATTENTION_ALPHA) @ key.transpose(-1, -2)
    scores = (scores - scores.amax(dim=-1, keepdim=True)) * ATTENTION_ALPHA
    if padding is not None:
      scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    if bias is not None:
      if self.gated:
        gates = torch.sigmoid(self.grep_linear(query).view(b, self.heads, t, 2, 4).sum(-1))
        update, reset = gates[..., :1], gates[..., 1:]
        bias = (update * (reset * self.grep_a - 1.0) + 2.0) * bias[None]
      scores = scores + bias.to(scores.dtype)
    attended = torch.softmax(scores, dim=-1) @ value
    return self.out_proj(attended.transpose(1, 2).reshape(b, t, c))


class BeatsLayer(nn.Module):
  """One Transformer block: post-LN with deep-norm residual scaling, or pre-LN."""

  def __init__(self, cfg: BeatsConfig, owns_bias: bool):
    super().__init__()
    dim = cfg.encoder_embed_dim
    self.self_attn = GatedRelativeAttention(cfg, owns_bias)
    self.self_attn_layer_norm = nn.LayerNorm(dim)
    self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
    self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
    self.final_layer_norm = nn.LayerNorm(dim)
    self.pre_norm = cfg.layer_norm_first
    self.alpha = cfg.deep_norm_alpha
    self.activation = {"gelu": _gelu,
                       "gelu_accurate": functools.partial(F.gelu, approximate="tanh"),
                       "relu": F.relu}[cfg.activation_fn]

  def forward(self, x, bias, padding):
    if self.pre_norm:
      x = x + self.self_attn(self.self_attn_layer_norm(x), bias, padding)
      return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))
    x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, bias, padding))
    return self.final_layer_norm(x * self.alpha + self.fc2(self.activation(self.fc1(x))))


def _gelu(y: torch.Tensor) -> torch.Tensor:
  """Exact GELU, computed in at least float32 (BEATs upcasts half precision for it)."""
  low = y.dtype in (torch.float16, torch.bfloat16)
  return F.gelu(y.float() if low else y).type_as(y)


class PositionalConv(nn.Module):
  """Weight-normed (over all but the kernel axis) grouped Conv1d, trimmed to length, GELU."""

  def __init__(self, dim: int, kernel: int, groups: int):
    super().__init__()
    self.kernel, self.groups = kernel, groups
    self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
    std = math.sqrt(4 / (kernel * dim))
    self.weight_v = nn.Parameter(torch.randn(dim, dim // groups, kernel) * std)
    self.bias = nn.Parameter(torch.zeros(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> [B, T, C]."""
    weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
    y = F.conv1d(x.transpose(1, 2), weight, self.bias, padding=self.kernel // 2, groups=self.groups)
    return F.gelu(y[..., : x.shape[1]]).transpose(1, 2)


class BeatsEncoder(nn.Module):
  def __init__(self, cfg: BeatsConfig):
    super().__init__()
    self.cfg = cfg
    self.pos_conv = PositionalConv(cfg.encoder_embed_dim, cfg.conv_pos, cfg.conv_pos_groups)
    self.layers = nn.ModuleList(
        BeatsLayer(cfg, owns_bias=cfg.relative_position_embedding and i == 0)
        for i in range(cfg.encoder_layers))
    self.layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)

  def position_bias(self, length: int, device) -> torch.Tensor | None:
    """[H, T, T] relative position bias, computed once and shared by every block."""
    if not self.cfg.relative_position_embedding:
      return None
    buckets = relative_buckets(length, self.cfg.num_buckets, self.cfg.max_distance, device)
    return self.layers[0].self_attn.relative_attention_bias(buckets).permute(2, 0, 1)

  def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[B, T, C] -> hidden states [encoder input, block 1, ..., encoder output]."""
    if padding is not None:
      x = x.masked_fill(padding[..., None], 0.0)
    x = x + self.pos_conv(x)
    if not self.cfg.layer_norm_first:
      x = self.layer_norm(x)
    bias = self.position_bias(x.shape[1], x.device)
    states = [x]
    for layer in self.layers:
      states.append(layer(states[-1], bias, padding))
    if self.cfg.layer_norm_first:
      states[-1] = self.layer_norm(states[-1])
    return states


@dataclasses.dataclass
class BeatsOutput:
  """Hidden states [B, N, C] (encoder input, each block, output) and the token padding mask."""
  hidden_states: list[torch.Tensor]
  padding_mask: torch.Tensor | None

  @property
  def last_hidden_state(self) -> torch.Tensor:
    return self.hidden_states[-1]


class Beats(nn.Module):
  """BEATs as a feature extractor (the fine-tuned checkpoint's classifier is not used, as in
  SALMONN's `extract_features(..., feature_only=True)`)."""

  def __init__(self, cfg: BeatsConfig):
    super().__init__()
    self.cfg = cfg
    patch = cfg.input_patch_size
    self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=patch, stride=patch,
                                     bias=cfg.conv_bias)
    self.layer_norm = nn.LayerNorm(cfg.embed_dim)
    self.post_extract_proj = (nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
                              if cfg.embed_dim != cfg.encoder_embed_dim else None)
    self.encoder = BeatsEncoder(cfg)

  @property
  def width(self) -> int:
    return self.cfg.encoder_embed_dim

  def forward(self, waves: torch.Tensor, padding_mask: torch.Tensor | None = None) -> BeatsOutput:
    """[B, S] 16 kHz waveforms (padding_mask [B, S], True = padding) -> hidden states."""
    return self.from_fbank(preprocess(waves), padding_mask)

  def from_fbank(self, fbank: torch.Tensor,
                 padding_mask: torch.Tensor | None = None) -> BeatsOutput:
    """[B, frames, 128] normalised fbank -> hidden states; padding_mask is per sample or frame."""
    weight = self.patch_embedding.weight
    if fbank.shape[1] < self.cfg.input_patch_size:
      patch = self.cfg.input_patch_size
      raise ValueError(f"BEATs needs at least {patch} fbank frames ({400 + 160 * (patch - 1)} "
                       f"samples); got {fbank.shape[1]}")
    if padding_mask is not None:
      padding_mask = _pool_padding(padding_mask, fbank.shape[1])
    patches = self.patch_embedding(fbank.to(weight.dtype)[:, None])  # [B, E, T/P, mels/P]
    x = self.layer_norm(patches.flatten(2).transpose(1, 2))
    if padding_mask is not None:
      padding_mask = _pool_padding(padding_mask, x.shape[1])
    if self.post_extract_proj is not None:
      x = self.post_extract_proj(x)
    return BeatsOutput(self.encoder(x, padding_mask), padding_mask)


def _pool_padding(padding: torch.Tensor, length: int) -> torch.Tensor:
  """BEATs' forward_padding_mask: drop the remainder, then a step is padding only if every
  sample (or frame) it covers is."""
  extra = padding.shape[1] % length
  if extra:
    padding = padding[:, :-extra]
  return padding.view(padding.shape[0], length, -1).all(-1)


# Released iter3+ architecture at toy width (patch and mel sizes kept: they fix the token rate).
TINY_CFG = dict(
    input_patch_size=16, embed_dim=16, conv_bias=False, encoder_layers=2, encoder_embed_dim=24,
    encoder_ffn_embed_dim=48, encoder_attention_heads=4, activation_fn="gelu",
    layer_norm_first=False, deep_norm=True, conv_pos=16, conv_pos_groups=4,
    relative_position_embedding=True, num_buckets=32, max_distance=64, gru_rel_pos=True)


def build_tiny(seed: int = 0, **overrides) -> Beats:
  """A tiny random BEATs with the iter3+ architecture (deep norm, gated relative bias)."""
  cfg = BeatsConfig(**{**TINY_CFG, **overrides})
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(seed)
    model = Beats(cfg)
    for name, p in model.named_parameters():
      if name.endswith("grep_a"):
        nn.init.uniform_(p, 0.5, 1.5)  # BEATs initialises the gate scale to 1: vary it
      elif name.endswith("relative_attention_bias.weight"):
        nn.init.normal_(p, std=0.5)
  return model.eval()
