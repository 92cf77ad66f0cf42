"""SALMONN's auditory front and its LLM as one torch module: the adapter (engine.models.salmonn)
and the checkpoint converter (engine.models.convert_salmonn) both build on it.

Whisper's encoder (+ an optional BEATs stream), each stream layer-normed and concatenated, cut
into windows that a BLIP-2 Q-Former reads with learned queries, a linear projection into the
LLM's embedding space, and the (LoRA) LLaMA decoder.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def windows(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
  """[B, T, C] -> [B, W, kernel, C] windows, W = (T - kernel) // stride + 1 (SALMONN's unfold)."""
  return x.unfold(1, kernel, stride).transpose(-1, -2)


class SalmonnModel(nn.Module):
  """Whisper encoder, optional BEATs channel, window-level Q-Former, projection, LoRA LLaMA.

  `beats_dim` > 0 means the Q-Former was trained on Whisper+BEATs features. `beats` is then a
  callable (waveforms [B, S], padding mask [B, S]) -> [B, T', beats_dim]; without it the BEATs
  channels are zero, which is what SALMONN itself feeds past the end of BEATs' output.
  """

  def __init__(self, whisper: nn.Module, qformer: nn.Module, llm: nn.Module, *,
               num_query_tokens: int = 1, beats_dim: int = 0,
               beats: Callable | None = None):
    super().__init__()
    width = whisper.config.d_model
    self.whisper = whisper
    self.ln_speech = nn.LayerNorm(width)
    self.beats_dim = beats_dim
    self.ln_audio = nn.LayerNorm(beats_dim) if beats_dim else None
    self.beats = beats
    if qformer.config.encoder_hidden_size != width + beats_dim:
      raise ValueError(f"Q-Former reads {qformer.config.encoder_hidden_size}-dim features but "
                       f"Whisper ({width}) + BEATs ({beats_dim}) give {width + beats_dim}")
    self.qformer = qformer
    self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer.config.hidden_size))
    self.llm = llm
    self.proj = nn.Linear(qformer.config.hidden_size, self.llama.config.hidden_size)

  @property
  def llama(self) -> nn.Module:
    """The `LlamaModel` (with LoRA layers injected when wrapped by peft)."""
    return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

  @property
  def num_queries(self) -> int:
    return self.query_tokens.shape[1]

  def auditory(self, features: torch.Tensor, kernel: int, stride: int,
               waveforms: torch.Tensor | None = None, wave_mask: torch.Tensor | None = None):
    """Whisper features [B, mels, frames] -> (whisper out [B, T, C], Q-Former out [B, W*Q, H],
    LLM input tokens [B, W*Q, D])."""
    whisper_out = self.whisper(features).last_hidden_state
    speech = self.ln_speech(whisper_out)
    if self.beats_dim:
      speech = torch.cat([speech, self._beats_channel(speech, waveforms, wave_mask)], dim=-1)
    b = speech.shape[0]
    win = windows(speech, kernel, stride)
    n_windows = win.shape[1]
    win = win.reshape(b * n_windows, kernel, speech.shape[-1])
    queries = self.query_tokens.expand(win.shape[0], -1, -1).to(win.dtype)
    q_out = self.qformer(query_embeds=queries, encoder_hidden_states=win).last_hidden_state
    q_out = q_out.reshape(b, n_windows * self.num_queries, -1)
    return whisper_out, q_out, self.proj(q_out)

  def _beats_channel(self, speech, waveforms, wave_mask):
    b, t, _ = speech.shape
    if self.beats is None or waveforms is None:
      return speech.new_zeros(b, t, self.beats_dim)
    audio = self.ln_audio(self.beats(waveforms, wave_mask).to(speech.dtype))[:, :t]
    return nn.functional.pad(audio, (0, 0, 0, t - audio.shape[1]))
