"""SONAR's speech encoder as torch modules: the adapter (engine.models.sonar) and the checkpoint
converter (engine.models.convert_sonar) both build on them.

A w2v-BERT conformer (transformers' `Wav2Vec2BertModel`) whose convolution modules are SONAR's
(BatchNorm, symmetric 'same' padding), a closing LayerNorm, then an attention pooler: a
post-norm transformer decoder fed a single BOS token that cross-attends to the encoder output,
followed by a bias-free linear.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from engine.models.common import recording


class ConformerConvolution(nn.Module):
  """SONAR's conformer convolution: LN, pointwise+GLU, 'same' depthwise conv, BatchNorm, SiLU,
  pointwise. Same parameter names as transformers' w2v-BERT module, BatchNorm in place of its
  depthwise LayerNorm and symmetric instead of causal padding."""

  def __init__(self, hidden: int, kernel_size: int, eps: float = 1e-5):
    super().__init__()
    if kernel_size % 2 != 1:
      raise ValueError(f"depthwise kernel size must be odd for 'same' padding, got {kernel_size}")
    self.layer_norm = nn.LayerNorm(hidden, eps=eps)
    self.pointwise_conv1 = nn.Conv1d(hidden, 2 * hidden, 1, bias=False)
    self.glu = nn.GLU(dim=1)
    self.depthwise_conv = nn.Conv1d(hidden, hidden, kernel_size, padding=kernel_size // 2,
                                    groups=hidden, bias=False)
    self.batch_norm = nn.BatchNorm1d(hidden)
    self.activation = nn.SiLU()
    self.pointwise_conv2 = nn.Conv1d(hidden, hidden, 1, bias=False)

  def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
    x = self.layer_norm(hidden_states)
    if attention_mask is not None:  # padding must not leak into valid frames through the conv
      x = x.masked_fill(~attention_mask.bool().unsqueeze(-1), 0.0)
    x = self.glu(self.pointwise_conv1(x.transpose(1, 2)))
    x = self.activation(self.batch_norm(self.depthwise_conv(x)))
    return self.pointwise_conv2(x).transpose(1, 2)


@dataclasses.dataclass(frozen=True)
class PoolerConfig:
  """SONAR's attention pooler: `layers` post-norm decoder layers over one BOS token."""
  dim: int
  layers: int
  heads: int
  ffn_dim: int
  num_embeddings: int
  bos_idx: int = 2


def sinusoid_at(step: int, dim: int) -> torch.Tensor:
  """fairseq2's sinusoidal position code at one step: sines in the first half, cosines after."""
  half = dim // 2
  freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -math.log(10000.0) / (half - 1))
  return torch.cat([torch.sin(step * freqs), torch.cos(step * freqs)]).float()


class AttentionPooler(nn.Module):
  """One BOS query (scaled embedding + position 0) through a post-norm decoder, then a bias-free
  linear: a learned, padding-aware weighted summary of the speech encoder output."""

  def __init__(self, config: PoolerConfig):
    super().__init__()
    self.config = config
    self.embed = nn.Embedding(config.num_embeddings, config.dim)
    layer = nn.TransformerDecoderLayer(config.dim, config.heads, config.ffn_dim, dropout=0.0,
                                       activation="relu", batch_first=True, norm_first=False)
    self.decoder = nn.TransformerDecoder(layer, config.layers)
    self.proj = nn.Linear(config.dim, config.dim, bias=False)
    self.register_buffer("position", sinusoid_at(0, config.dim), persistent=False)

  def forward(self, encoder_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, D] encoder output, [B, T] validity -> [B, D] sentence embedding."""
    bos = self.embed.weight[self.config.bos_idx] * math.sqrt(self.config.dim)
    query = (bos + self.position.to(bos.dtype)).expand(encoder_out.shape[0], 1, -1)
    out = self.decoder(query, encoder_out, memory_key_padding_mask=~mask.bool())
    return self.proj(out)[:, 0]


class SonarSpeechEncoder(nn.Module):
  """w2v-BERT conformer (SONAR's convolutions) + closing LayerNorm + attention pooler."""

  def __init__(self, config, pooler: PoolerConfig):
    super().__init__()
    from transformers import Wav2Vec2BertModel  # pylint: disable=import-outside-toplevel
    if config.position_embeddings_type != "relative":
      raise ValueError("SONAR's conformer uses 'relative' (Transformer-XL) position encodings")
    self.w2v = Wav2Vec2BertModel(config)
    for layer in self.w2v.encoder.layers:
      layer.conv_module = ConformerConvolution(config.hidden_size, config.conv_depthwise_kernel_size,
                                               config.layer_norm_eps)
    self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.pooler = AttentionPooler(pooler)

  @property
  def num_layers(self) -> int:
    return len(self.w2v.encoder.layers)

  def forward(self, features: torch.Tensor, mask: torch.Tensor):
    """[B, T, 160] stacked fbanks, [B, T] mask -> (L+1 hidden states, [B, D] embedding)."""
    layers = self.w2v.encoder.layers
    with recording([self.w2v.feature_projection, *layers]) as states:
      encoded = self.w2v(input_features=features, attention_mask=mask.long()).last_hidden_state
    encoded = self.layer_norm(encoded)
    hidden = states[:-1] + [encoded]
    return hidden, self.pooler(encoded, mask)
