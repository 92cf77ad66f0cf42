"""SALMONN seen as sites of activations, rebuilt from transformers components.

SALMONN (Tang et al., ICLR 2024): Whisper's encoder (+ a BEATs audio stream, optional here),
each stream layer-normed and concatenated, cut into ~0.33 s windows (17 frames of Whisper's
50 Hz output, stride 17) that a BLIP-2 Q-Former reads with one learned query per window; a
linear layer projects the window tokens into Vicuna/LLaMA (LoRA on q_proj/v_proj), where they
replace <SpeechHere> in "USER: <Speech><SpeechHere></Speech> {instruction}\\nASSISTANT:".
Whisper always sees 30 s (inputs are padded or cut there), so every utterance gives 88
window tokens. Text enters the LLM embeddings directly, by default in the same template in
place of the speech tokens (`text_prompt='plain'` feeds BOS + the sentence only).

Sites (key = (site, layer)):
* ('whisper', 0)  speech: Whisper encoder output (after its final LayerNorm), 50 Hz frames.
* ('qformer', 0)  speech: Q-Former output, one vector per window and query (the length
  adaptation), before the projection.
* ('llm', l), l = 0..L, text and speech: l=0 the LLM input embeddings (token embeddings /
  projected window tokens), l=1..L-1 the decoder block outputs, l=L the final RMSNorm output
  (transformers' `output_hidden_states` convention).
Masks (`mask_scope`): 'sentence' (default) keeps only the sentence's own positions: frames and
windows that overlap the utterance, the sentence's tokens inside the prompt; never the
template, BOS or the silence Whisper pads to 30 s. 'all' keeps every computed position. The
LLM is causal, so sentence positions never see the template text to their right.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from engine.models import bpe, common
from engine.models.base import Capture, Family, Site
from engine.models.common import SAMPLING_RATE, TorchAdapter, recording
from engine.models.salmonn_modules import SalmonnModel

WHISPER_SITE = "whisper"
QFORMER_SITE = "qformer"
LLM_SITE = "llm"
FAMILY = Family(
    name="salmonn", random=r"salmonn-tiny$",
    site_map={"text": LLM_SITE, "speech": (LLM_SITE, WHISPER_SITE, QFORMER_SITE),
              "pre_adaptor": WHISPER_SITE, "post_adaptor": QFORMER_SITE})
PROMPT_TEMPLATE = "USER: <Speech><SpeechHere></Speech> {}\nASSISTANT:"
SPEECH_SLOT = "<SpeechHere>"
DEFAULT_INSTRUCTION = "Recognize the speech and give me the transcription."
MASK_SCOPES = ("sentence", "all")
TEXT_PROMPTS = ("template", "plain")
# Embedding rows of the tiny LLM: fixed (>= bytes + bundled-corpus BPE), so the random weights
# never depend on what the bundled corpus holds.
TINY_VOCAB = 37888

# Released SALMONN builds: Whisper and Vicuna hub ids; the SALMONN checkpoint is a local file.
RECIPES = {
    "salmonn-13b": {"whisper": "openai/whisper-large-v2", "llm": "lmsys/vicuna-13b-v1.1"},
    "salmonn-7b": {"whisper": "openai/whisper-large-v2", "llm": "lmsys/vicuna-7b-v1.5"},
}


@dataclasses.dataclass(frozen=True)
class SalmonnOptions:
  """How sentences enter the model and which positions count as the sentence."""
  window_seconds: float = 0.333333
  stride_seconds: float = 0.333333
  prompt_template: str = PROMPT_TEMPLATE
  instruction: str = DEFAULT_INSTRUCTION
  mask_scope: str = "sentence"
  text_prompt: str = "template"

  def __post_init__(self):
    if self.mask_scope not in MASK_SCOPES:
      raise ValueError(f"unknown mask_scope {self.mask_scope!r}; choose one of {MASK_SCOPES}")
    if self.text_prompt not in TEXT_PROMPTS:
      raise ValueError(f"unknown text_prompt {self.text_prompt!r}; choose one of {TEXT_PROMPTS}")
    if self.prompt_template.count(SPEECH_SLOT) != 1:
      raise ValueError(f"prompt_template {self.prompt_template!r} must contain {SPEECH_SLOT} once")


# ---------------------------------------------------------------------------------------------
# Tiny random configuration and its offline tokenizer.


def tiny_llama_tokenizer():
  """A real `LlamaTokenizer` built offline: LLaMA's <unk>/<s>/</s> and 256 byte-fallback
  tokens over the bundled-corpus BPE shared with the other tiny models."""
  from transformers import LlamaTokenizer  # pylint: disable=import-outside-toplevel
  tokens, merges = bpe.bundled_tokens()
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  for byte in range(256):
    vocab[f"<0x{byte:02X}>"] = len(vocab)
  for token in tokens:
    if token != "<pad>":
      vocab.setdefault(token, len(vocab))
  if len(vocab) > TINY_VOCAB:
    raise ValueError(f"offline LLaMA tokenizer has {len(vocab)} tokens, more than TINY_VOCAB")
  return LlamaTokenizer(vocab=vocab, merges=merges)


def build_tiny(seed: int = 0):
  """(tokenizer, feature extractor, SalmonnModel) with tiny random weights, no BEATs."""
  # pylint: disable=import-outside-toplevel
  import peft
  from transformers import (Blip2QFormerConfig, Blip2QFormerModel, LlamaConfig, LlamaModel,
                            WhisperConfig, WhisperFeatureExtractor)
  from transformers.models.whisper.modeling_whisper import WhisperEncoder
  tokenizer = tiny_llama_tokenizer()
  whisper_cfg = WhisperConfig(
      num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4,
      encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
      max_source_positions=1500, dropout=0.0, attention_dropout=0.0,
      activation_dropout=0.0, encoder_layerdrop=0.0)
  qformer_cfg = Blip2QFormerConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      cross_attention_frequency=1, encoder_hidden_size=32, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0)
  llama_cfg = LlamaConfig(
      vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
      bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6, attention_dropout=0.0)
  lora = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                         init_lora_weights=False)
  with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # peft probing a deprecated transformers API
    torch.manual_seed(seed)
    whisper = WhisperEncoder(whisper_cfg)
    qformer = Blip2QFormerModel(qformer_cfg)
    llm = peft.get_peft_model(LlamaModel(llama_cfg), lora)
    model = SalmonnModel(whisper, qformer, llm)
    nn.init.normal_(model.query_tokens, std=0.02)
  return tokenizer, WhisperFeatureExtractor(), model


# ---------------------------------------------------------------------------------------------
# The adapter.


class SalmonnAdapter(TorchAdapter):
  """SALMONN behind the adapter interface: Whisper, Q-Former and LLM sites for both modalities."""

  family = FAMILY

  def __init__(self, *, name: str, tokenizer, feature_extractor, model: SalmonnModel,
               options: SalmonnOptions = SalmonnOptions(), device: str = "cpu",
               dtype: str = "float32", weights: dict | None = None):
    super().__init__(name=name, tokenizer=tokenizer, device=device, dtype=dtype,
                     weights=weights or {})
    self.features = feature_extractor
    self.options = options
    self.model = self.place(model)
    chunk = float(feature_extractor.chunk_length)
    frames = model.whisper.config.max_source_positions  # encoder frames in one chunk (1500)
    self.chunk_seconds = chunk
    self.frame_samples = int(round(SAMPLING_RATE * chunk / frames))  # 320 samples = 20 ms
    self.kernel = round(frames * options.window_seconds / chunk)
    self.stride = round(frames * options.stride_seconds / chunk)
    self.n_windows = (frames - self.kernel) // self.stride + 1
    left, right = options.prompt_template.format(options.instruction).split(SPEECH_SLOT)
    self._left = self._ids(left)
    self._right = self._ids(right)

  # -- interface ------------------------------------------------------------------------------

  def sites(self) -> list[Site]:
    n = self.model.llama.config.num_hidden_layers + 1
    return [Site(WHISPER_SITE, "speech", 1), Site(QFORMER_SITE, "speech", 1),
            Site(LLM_SITE, "text", n), Site(LLM_SITE, "speech", n)]

  def run_text(self, texts: Sequence[str], language: str) -> dict[tuple[str, int], Capture]:
    del language  # the LLM takes every language through the same tokenizer
    embed = self.model.llama.get_input_embeddings()
    rows, spans = [], []
    for text in texts:
      ids = self._ids(text)
      if not ids:
        raise ValueError(f"sentence {text!r} has no tokens")
      pieces = [ids] if self.options.text_prompt == "plain" else [self._left, ids, self._right]
      sentence_at = 0 if self.options.text_prompt == "plain" else 1
      with torch.inference_mode():
        parts = [embed(torch.tensor(p, dtype=torch.long, device=self.device)) for p in pieces]
      rows.append(parts)
      spans.append((sentence_at, torch.ones(len(ids), dtype=torch.bool, device=self.device)))
    return self._llm_captures(rows, spans)

  def run_speech(self, audios: Sequence[np.ndarray], sampling_rate: int,
                 language: str) -> dict[tuple[str, int], Capture]:
    del language  # Whisper's encoder is multilingual; SALMONN's prompt names no language
    if sampling_rate != SAMPLING_RATE:
      raise ValueError(f"SALMONN takes {SAMPLING_RATE} Hz speech; got sampling_rate={sampling_rate}")
    limit = int(self.chunk_seconds * SAMPLING_RATE)
    waves = [np.asarray(a, dtype=np.float32)[:limit] for a in audios]  # SALMONN cuts at 30 s
    feats = self.features(waves, sampling_rate=SAMPLING_RATE, return_tensors="pt")
    feats = feats["input_features"].to(self.device, self.dtype)
    wave_batch, wave_pad = _pad_waves(waves, self.device, self.dtype)
    with torch.inference_mode():
      whisper_out, q_out, tokens = self.model.auditory(feats, self.kernel, self.stride,
                                                       wave_batch, wave_pad)
    frames = whisper_out.shape[1]
    valid = torch.tensor([math.ceil(len(w) / self.frame_samples) for w in waves], device=self.device)
    frame_mask = torch.arange(frames, device=self.device)[None] < valid[:, None]
    starts = torch.arange(q_out.shape[1] // self.model.num_queries, device=self.device) * self.stride
    window_mask = (starts[None] < valid[:, None]).repeat_interleave(self.model.num_queries, dim=1)
    if self.options.mask_scope == "all":
      frame_mask = torch.ones_like(frame_mask)
      window_mask = torch.ones_like(window_mask)
    embed = self.model.llama.get_input_embeddings()
    with torch.inference_mode():
      left = embed(torch.tensor(self._left, dtype=torch.long, device=self.device))
      right = embed(torch.tensor(self._right, dtype=torch.long, device=self.device))
    rows = [[left, tokens[i], right] for i in range(len(waves))]
    spans = [(1, window_mask[i]) for i in range(len(waves))]
    out = self._llm_captures(rows, spans)
    out[(WHISPER_SITE, 0)] = Capture(whisper_out, frame_mask)
    out[(QFORMER_SITE, 0)] = Capture(q_out, window_mask)
    return out

  def describe(self) -> dict:
    o = self.options
    beats = ("absent: Q-Former has no BEATs channels" if not self.model.beats_dim else
             "present" if self.model.beats is not None else
             "absent: the Q-Former's BEATs channels are fed zeros")
    return {
        **super().describe(), "beats": beats,
        "window_frames": self.kernel, "stride_frames": self.stride, "windows": self.n_windows,
        "queries_per_window": self.model.num_queries, "chunk_seconds": self.chunk_seconds,
        "prompt_template": o.prompt_template, "instruction": o.instruction,
        "text_prompt": o.text_prompt, "mask_scope": o.mask_scope,
        "layer_convention": "llm: 0 = input embeddings, 1..L-1 = blocks, L = final RMSNorm output",
        "sites": [dataclasses.asdict(s) for s in self.sites()],
    }

  # -- helpers ----------------------------------------------------------------------------------

  def _ids(self, text: str) -> list[int]:
    return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

  def _llm_captures(self, rows: list[list[torch.Tensor]], spans) -> dict[tuple[str, int], Capture]:
    """Rows of embedding pieces (BOS prepended here), right-padded into one LLM batch."""
    llama = self.model.llama
    embed = llama.get_input_embeddings()
    with torch.inference_mode():
      bos = embed(torch.tensor([self.tokenizer.bos_token_id], device=self.device))
      seqs, sentence = [], []
      for parts, (at, valid) in zip(rows, spans):
        pieces = [bos] + [p.to(bos.dtype) for p in parts]
        seqs.append(torch.cat(pieces))
        masks = [torch.zeros(len(p), dtype=torch.bool, device=self.device) for p in pieces]
        masks[at + 1] = valid
        sentence.append(torch.cat(masks))
      length = max(len(s) for s in seqs)
      inputs = torch.stack([nn.functional.pad(s, (0, 0, 0, length - len(s))) for s in seqs])
      attention = torch.stack([torch.arange(length, device=self.device) < len(s) for s in seqs])
      mask = torch.stack([nn.functional.pad(m, (0, length - len(m))) for m in sentence])
      if self.options.mask_scope == "all":
        mask = attention
      with recording(list(llama.layers)) as blocks:
        final = self.model.llm(inputs_embeds=inputs, attention_mask=attention.long()).last_hidden_state
    hidden = [inputs] + blocks[:-1] + [final]
    return {(LLM_SITE, l): Capture(h, mask) for l, h in enumerate(hidden)}


def _pad_waves(waves: list[np.ndarray], device, dtype):
  """Waveforms -> [B, S] batch and a [B, S] padding mask (True = padding), for BEATs."""
  length = max(len(w) for w in waves)
  batch = torch.zeros(len(waves), length, dtype=dtype, device=device)
  pad = torch.ones(len(waves), length, dtype=torch.bool, device=device)
  for i, w in enumerate(waves):
    batch[i, : len(w)] = torch.tensor(w, dtype=dtype, device=device)
    pad[i, : len(w)] = False
  return batch, pad


# ---------------------------------------------------------------------------------------------
# Loading.


def _options(kw: dict) -> SalmonnOptions:
  fields = {f.name for f in dataclasses.fields(SalmonnOptions)}
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ValueError(f"unknown SALMONN options {unknown}; known: {sorted(fields)}")
  return SalmonnOptions(**kw)


def _resolve(model: str, whisper, llm, checkpoint) -> tuple[str, str, str]:
  """Whisper/LLM/checkpoint locations from explicit paths, a local directory or a recipe."""
  recipe = RECIPES.get(model.lower(), {})
  if os.path.isdir(model):
    whisper = whisper or os.path.join(model, "whisper")
    llm = llm or next((os.path.join(model, d) for d in ("vicuna", "llm", "llama")
                       if os.path.isdir(os.path.join(model, d))), None)
    found = sorted(glob.glob(os.path.join(model, "*.pth")) + glob.glob(os.path.join(model, "*.pt")))
    checkpoint = checkpoint or (found[0] if found else None)
  whisper, llm = whisper or recipe.get("whisper"), llm or recipe.get("llm")
  for what, value in (("whisper", whisper), ("llm", llm), ("checkpoint", checkpoint)):
    if not value:
      raise ValueError(f"SALMONN model {model!r}: no {what} given; pass {what}=... or a directory "
                       "with whisper/, vicuna/ and the SALMONN .pth checkpoint")
  return whisper, llm, checkpoint


def load(model: str, device: str = "cpu", dtype: str = "float32", *, whisper: str | None = None,
         llm: str | None = None, checkpoint: str | None = None, beats: Callable | None = None,
         qformer_heads: int = 12, lora_alpha: float = 32.0, seed: int = 0,
         **options) -> SalmonnAdapter:
  """'salmonn-tiny' (random, offline), or real weights.

  Real weights: Whisper (`whisper`, hub id or dir, default openai/whisper-large-v2 for the
  recipes 'salmonn-13b'/'salmonn-7b'), the Vicuna LLM (`llm`), and the released SALMONN
  checkpoint (`checkpoint`, a local .pth with the Q-Former, projection and LoRA weights). A
  local directory holding whisper/, vicuna/ and the .pth works as `model` too. `beats` is an
  optional BEATs callable; without it the BEATs channels are zero (see describe()).
  Remaining keyword arguments are `SalmonnOptions` fields.
  """
  opts = _options(options)
  if FAMILY.random_match(model):
    tok, fe, net = build_tiny(seed)
    return SalmonnAdapter(name=model, tokenizer=tok, feature_extractor=fe, model=net,
                          options=opts, device=device, dtype=dtype,
                          weights={"all": f"random seed={seed}"})
  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer, LlamaModel, WhisperFeatureExtractor, WhisperModel
  from engine.models import convert_salmonn
  whisper_id, llm_id, ckpt = _resolve(model, whisper, llm, checkpoint)
  state = convert_salmonn.model_state(ckpt)
  torch_type = common.torch_dtype(dtype)
  encoder = WhisperModel.from_pretrained(whisper_id, dtype=torch_type).get_encoder()
  llama = LlamaModel.from_pretrained(llm_id, dtype=torch_type)
  net = convert_salmonn.build_model(state, encoder, llama, qformer_heads=qformer_heads,
                                    lora_alpha=lora_alpha, beats=beats)
  return SalmonnAdapter(
      name=model, tokenizer=AutoTokenizer.from_pretrained(llm_id),
      feature_extractor=WhisperFeatureExtractor.from_pretrained(whisper_id), model=net,
      options=opts, device=device, dtype=dtype,
      weights={"whisper": whisper_id, "llm": llm_id, "checkpoint": ckpt})
