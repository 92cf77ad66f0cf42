"""SALMONN's auditory front and its LLM as one torch module: the adapter (engine.models.salmonn)
and the checkpoint converter (engine.models.convert_salmonn) both build on it.

Whisper's encoder and a BEATs encoder (`engine.models.beats`), each stream layer-normed and
concatenated frame by frame as SALMONN aligns them, cut into windows that a BLIP-2 Q-Former
reads with learned queries, a linear projection into the LLM's embedding space, and the
(LoRA) LLaMA decoder.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn


def windows(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
  """[B, T, C] -> [B, W, kernel, C] windows, W = (T - kernel) // stride + 1 (SALMONN's unfold)."""
  return x.unfold(1, kernel, stride).transpose(-1, -2)


def align(speech: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
  """SALMONN's frame alignment: Whisper frames [B, T, C] and BEATs tokens [B, N, D] are paired
  by index, the shorter stream zero-padded at the end, then concatenated: [B, max(T, N), C + D].
  (Both run at 50 per second; a 30 s chunk gives 1500 Whisper frames and at most 1496 BEATs
  tokens, so BEATs is the padded one.)"""
  length = max(speech.shape[1], audio.shape[1])
  pad = lambda x: nn.functional.pad(x, (0, 0, 0, length - x.shape[1]))
  return torch.cat([pad(speech), pad(audio.to(speech.dtype))], dim=-1)


def pad_rows(rows: Sequence[torch.Tensor], length: int | None = None) -> torch.Tensor:
  """[N_i, D] tensors -> [B, max N_i (or length), D], zero-padded at the end."""
  length = length or max(r.shape[0] for r in rows)
  return torch.stack([nn.functional.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows])


@dataclasses.dataclass
class Auditory:
  """One speech batch through SALMONN's auditory front, every stage kept.

  whisper: Whisper encoder hidden states (embeddings, each block, final LayerNorm), [B, T, C].
  beats:   BEATs hidden states per utterance (encoder input, each block): [layer][item] [N_i, D];
           None without a BEATs encoder.
  qformer: each Q-Former block's output, [B, W*Q, H] (windows x queries, in time order).
  tokens:  the projection into the LLM's embedding space, [B, W*Q, D_llm].
  """
  whisper: list[torch.Tensor]
  beats: list[list[torch.Tensor]] | None
  qformer: list[torch.Tensor]
  tokens: torch.Tensor


class SalmonnModel(nn.Module):
  """Whisper encoder, optional BEATs encoder, window-level Q-Former, projection, LoRA LLaMA.

  `beats_dim` > 0 means the Q-Former was trained on Whisper+BEATs features; `beats` is then
  the BEATs encoder (`engine.models.beats.Beats`, `beats_dim` wide). Without it the BEATs
  channels are zero, which is what SALMONN itself feeds past the end of BEATs' output.
  """

  def __init__(self, whisper: nn.Module, qformer: nn.Module, llm: nn.Module, *,
               num_query_tokens: int = 1, beats_dim: int = 0, beats: nn.Module | None = None):
    super().__init__()
    width = whisper.config.d_model
    self.whisper = whisper
    self.ln_speech = nn.LayerNorm(width)
    self.beats_dim = beats_dim
    self.ln_audio = nn.LayerNorm(beats_dim) if beats_dim else None
    if beats is not None and beats.width != beats_dim:
      raise ValueError(f"BEATs gives {beats.width}-dim features but the Q-Former's BEATs "
                       f"channels (ln_audio) are {beats_dim}-dim")
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
               waves: Sequence[torch.Tensor] | None = None) -> Auditory:
    """Whisper features [B, mels, frames] (and, for BEATs, the batch's waveforms [S_i]) ->
    every stage's hidden states. BEATs runs on each waveform alone, as SALMONN's inference
    does, so an utterance's tokens never depend on what else is in the batch."""
    whisper_states = list(self.whisper(features, output_hidden_states=True).hidden_states)
    speech = self.ln_speech(whisper_states[-1])
    beats_states = None
    if self.beats_dim:
      if self.beats is not None and waves is not None:
        per_item = [self.beats(w[None]).hidden_states for w in waves]
        beats_states = [[item[l][0] for item in per_item] for l in range(len(per_item[0]))]
        audio = pad_rows([self.ln_audio(x) for x in beats_states[-1]])
      else:
        audio = speech.new_zeros(speech.shape[0], speech.shape[1], self.beats_dim)
      speech = align(speech, audio)
    b = speech.shape[0]
    win = windows(speech, kernel, stride)
    n_windows = win.shape[1]
    win = win.reshape(b * n_windows, kernel, speech.shape[-1])
    queries = self.query_tokens.expand(win.shape[0], -1, -1).to(win.dtype)
    q_out = self.qformer(query_embeds=queries, encoder_hidden_states=win, output_hidden_states=True)
    q_states = [h.reshape(b, n_windows * self.num_queries, -1) for h in q_out.hidden_states[1:]]
    return Auditory(whisper_states, beats_states, q_states, self.proj(q_states[-1]))
