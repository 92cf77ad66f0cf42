"""SALMONN seen as sites of activations, rebuilt from transformers components.

SALMONN (Tang et al., ICLR 2024): Whisper's encoder and a BEATs audio encoder
(`engine.models.beats`), each stream layer-normed and concatenated frame by frame
(`salmonn_modules.align`), cut into ~0.33 s windows (17 frames of Whisper's 50 Hz output,
stride 17) that a BLIP-2 Q-Former reads with one learned query per window; a linear layer
projects the window tokens into Vicuna/LLaMA (LoRA on q_proj/v_proj), where they replace
<SpeechHere> in "USER: <Speech><SpeechHere></Speech> {instruction}\\nASSISTANT:".
Whisper always sees 30 s (inputs are padded or cut there), so every utterance gives 88
window tokens. Text enters the LLM embeddings directly, by default in the same template in
place of the speech tokens (`text_prompt='plain'` feeds BOS + the sentence only).

Sites (key = (site, layer)); layer 0 is a stage's input, the last its output, as in
transformers' `output_hidden_states`:
* ('whisper', l), l = 0..Lw  speech: l=0 Whisper's conv + positional embeddings, l=1..Lw-1 the
  encoder blocks, l=Lw the output after its final LayerNorm; 50 Hz frames (1500 per 30 s).
* ('beats', l), l = 0..Lb  speech, when a BEATs encoder is loaded: l=0 the encoder input (patch
  embeddings after the positional convolution), l=1..Lb the blocks (Lb = what SALMONN reads);
  the utterance's own tokens (BEATs sees the waveform itself, padded to 1 s as SALMONN does).
* ('qformer', l), l = 0..Lq-1  speech: the output of Q-Former block l+1, one vector per window
  and query (the length adaptation); its input, the learned queries, is the same everywhere.
* ('proj', 0)  speech: the window tokens projected into the LLM's embedding space.
* ('llm', l), l = 0..L, text and speech: l=0 the LLM input embeddings (token embeddings /
  projected window tokens), l=1..L-1 the decoder block outputs, l=L the final RMSNorm output
  (transformers' `output_hidden_states` convention).
Masks (`mask_scope`): 'sentence' (default) keeps only the sentence's own positions: frames,
BEATs tokens and windows that overlap the utterance, the sentence's tokens inside the prompt;
never the template, BOS or the silence Whisper pads to 30 s. 'all' keeps every computed
position. The LLM is causal, so sentence positions never see the template text to their right.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn

from engine.models import beats as beats_model
from engine.models import bpe, common
from engine.models.base import Capture, Family, Site
from engine.models.common import SAMPLING_RATE, TorchAdapter, recording
from engine.models.salmonn_modules import SalmonnModel, pad_rows
from engine.models.salmonn_options import (  # pylint: disable=unused-import  (re-exported)
    DEFAULT_INSTRUCTION, MASK_SCOPES, PROMPT_TEMPLATE, SPEECH_SLOT, TEXT_PROMPTS, SalmonnOptions)

WHISPER_SITE = "whisper"
BEATS_SITE = "beats"
QFORMER_SITE = "qformer"
PROJ_SITE = "proj"
LLM_SITE = "llm"
FAMILY = Family(
    name="salmonn", random=r"salmonn-tiny$",
    site_map={"text": LLM_SITE,
              "speech": (LLM_SITE, WHISPER_SITE, BEATS_SITE, QFORMER_SITE, PROJ_SITE),
              "pre_adaptor": WHISPER_SITE, "post_adaptor": QFORMER_SITE})
MIN_SAMPLES = SAMPLING_RATE  # SALMONN pads shorter audio with silence to 1 s
# Embedding rows of the tiny LLM: fixed (>= bytes + bundled-corpus BPE), so the random weights
# never depend on what the bundled corpus holds.
TINY_VOCAB = 37888

# Released SALMONN builds: Whisper and Vicuna hub ids; the SALMONN checkpoint is a local file.
RECIPES = {
    "salmonn-13b": {"whisper": "openai/whisper-large-v2", "llm": "lmsys/vicuna-13b-v1.1"},
    "salmonn-7b": {"whisper": "openai/whisper-large-v2", "llm": "lmsys/vicuna-7b-v1.5"},
}


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


def build_tiny(seed: int = 0, with_beats: bool = True):
  """(tokenizer, feature extractor, SalmonnModel) with tiny random weights and a tiny random
  BEATs (`beats.TINY_CFG`), so the offline default runs every stage of the real path."""
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
      cross_attention_frequency=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      encoder_hidden_size=32 + beats_model.TINY_CFG["encoder_embed_dim"])
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
    audio = beats_model.build_tiny(seed) if with_beats else None
    model = SalmonnModel(whisper, qformer, llm, beats=audio,
                         beats_dim=beats_model.TINY_CFG["encoder_embed_dim"])
    nn.init.normal_(model.query_tokens, std=0.02)
    for norm in (model.ln_speech, model.ln_audio):  # not the identity: exercise both
      nn.init.normal_(norm.weight, 1.0, 0.2)
      nn.init.normal_(norm.bias, 0.0, 0.2)
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
    out = [Site(WHISPER_SITE, "speech", self.model.whisper.config.encoder_layers + 1)]
    if self.model.beats is not None:
      out.append(Site(BEATS_SITE, "speech", self.model.beats.cfg.encoder_layers + 1))
    return out + [Site(QFORMER_SITE, "speech", self.model.qformer.config.num_hidden_layers),
                  Site(PROJ_SITE, "speech", 1), Site(LLM_SITE, "text", n),
                  Site(LLM_SITE, "speech", n)]

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
    # BEATs reads the waveform itself, which SALMONN pads with silence to at least 1 s.
    raw = [torch.from_numpy(np.pad(w, (0, max(0, MIN_SAMPLES - len(w))))).to(self.device)
           for w in waves]
    with torch.inference_mode():
      stages = self.model.auditory(feats, self.kernel, self.stride, raw)
    frames = stages.whisper[0].shape[1]
    lengths = torch.tensor([len(w) for w in waves], device=self.device)
    valid = torch.ceil(lengths / self.frame_samples).long()
    frame_mask = torch.arange(frames, device=self.device)[None] < valid[:, None]
    windows_out = stages.tokens.shape[1] // self.model.num_queries
    starts = torch.arange(windows_out, device=self.device) * self.stride
    window_mask = (starts[None] < valid[:, None]).repeat_interleave(self.model.num_queries, dim=1)
    if self.options.mask_scope == "all":
      frame_mask = torch.ones_like(frame_mask)
      window_mask = torch.ones_like(window_mask)
    embed = self.model.llama.get_input_embeddings()
    with torch.inference_mode():
      left = embed(torch.tensor(self._left, dtype=torch.long, device=self.device))
      right = embed(torch.tensor(self._right, dtype=torch.long, device=self.device))
    rows = [[left, stages.tokens[i], right] for i in range(len(waves))]
    spans = [(1, window_mask[i]) for i in range(len(waves))]
    out = self._llm_captures(rows, spans)
    for l, hidden in enumerate(stages.whisper):
      out[(WHISPER_SITE, l)] = Capture(hidden, frame_mask)
    if stages.beats is not None:
      beats_mask = self._beats_mask([x.shape[0] for x in stages.beats[0]], lengths)
      for l, per_item in enumerate(stages.beats):
        out[(BEATS_SITE, l)] = Capture(pad_rows(per_item), beats_mask)
    for l, hidden in enumerate(stages.qformer):
      out[(QFORMER_SITE, l)] = Capture(hidden, window_mask)
    out[(PROJ_SITE, 0)] = Capture(stages.tokens, window_mask)
    return out

  def describe(self) -> dict:
    o = self.options
    return {
        **super().describe(), "beats": self._beats_state(),
        "without_beats": self.model.beats_dim > 0 and self.model.beats is None,
        "window_frames": self.kernel, "stride_frames": self.stride, "windows": self.n_windows,
        "queries_per_window": self.model.num_queries, "chunk_seconds": self.chunk_seconds,
        "prompt_template": o.prompt_template, "instruction": o.instruction,
        "text_prompt": o.text_prompt, "mask_scope": o.mask_scope,
        "layer_convention": ("0 = a stage's input, last = its output; whisper: last = after the "
                             "final LayerNorm; llm: L = final RMSNorm output; qformer: l = "
                             "block l+1"),
        "sites": [dataclasses.asdict(s) for s in self.sites()],
    }

  # -- helpers ----------------------------------------------------------------------------------

  def _beats_state(self) -> str:
    if not self.model.beats_dim:
      return "absent: the Q-Former has no BEATs channels"
    if self.model.beats is None:
      return ("ABSENT (without_beats): the Q-Former's BEATs channels are fed zeros, so every "
              "Q-Former, projection and speech LLM activation differs from SALMONN's")
    cfg = self.model.beats.cfg
    return f"present: {cfg.encoder_layers} blocks, {cfg.encoder_embed_dim} channels"

  def _beats_mask(self, counts: list[int], lengths: torch.Tensor) -> torch.Tensor:
    """[B, max count] validity of BEATs tokens: each item's own tokens; with mask_scope
    'sentence' only those whose time patch starts inside the utterance (not the 1 s pad)."""
    index = torch.arange(max(counts), device=self.device)[None]
    mask = index < torch.tensor(counts, device=self.device)[:, None]
    if self.options.mask_scope == "sentence":
      patch = self.model.beats.cfg.input_patch_size
      bands = beats_model.MEL_BINS // patch
      hop = int(SAMPLING_RATE * beats_model.FRAME_SHIFT_MS / 1000)
      mask &= (index // bands) * patch * hop < lengths[:, None]
    return mask

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


# ---------------------------------------------------------------------------------------------
# Loading.


def _options(kw: dict) -> SalmonnOptions:
  fields = {f.name for f in dataclasses.fields(SalmonnOptions)}
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ValueError(f"unknown SALMONN options {unknown}; known: {sorted(fields)}")
  return SalmonnOptions(**kw)


def _is_beats(path: str) -> bool:
  return os.path.basename(path).lower().startswith("beats")


def _resolve(model: str, whisper, llm, checkpoint, beats) -> tuple[str, str, str, object]:
  """Whisper/LLM/checkpoint/BEATs locations from explicit paths, a local directory or a recipe."""
  recipe = RECIPES.get(model.lower(), {})
  if os.path.isdir(model):
    whisper = whisper or os.path.join(model, "whisper")
    llm = llm or next((os.path.join(model, d) for d in ("vicuna", "llm", "llama")
                       if os.path.isdir(os.path.join(model, d))), None)
    found = sorted(glob.glob(os.path.join(model, "*.pth")) + glob.glob(os.path.join(model, "*.pt")))
    checkpoint = checkpoint or next((f for f in found if not _is_beats(f)), None)
    beats = beats or next((f for f in found if _is_beats(f)), None)
  whisper, llm = whisper or recipe.get("whisper"), llm or recipe.get("llm")
  for what, value in (("whisper", whisper), ("llm", llm), ("checkpoint", checkpoint)):
    if not value:
      raise ValueError(f"SALMONN model {model!r}: no {what} given; pass {what}=... or a directory "
                       "with whisper/, vicuna/, the SALMONN .pth and BEATs_*.pt checkpoints")
  return whisper, llm, checkpoint, beats


def _beats_for(state: dict, beats, without_beats: bool, ckpt: str):
  """The BEATs encoder a SALMONN checkpoint needs, or None; refuses to guess."""
  needs = state["ln_audio.weight"].shape[0] if "ln_audio.weight" in state else 0
  if beats is not None and without_beats:
    raise ValueError("SALMONN: pass beats=<BEATs checkpoint> or without_beats=True, not both")
  if not needs:
    if beats is not None:
      raise ValueError(f"SALMONN checkpoint {ckpt!r} has no BEATs channels (no ln_audio); "
                       "drop beats=")
    return None
  if beats is None:
    if without_beats:
      return None
    raise ValueError(f"SALMONN checkpoint {ckpt!r} reads {needs} BEATs channels (ln_audio) but no "
                     "BEATs checkpoint was given; pass beats=BEATs_iter3_plus_AS2M_finetuned_on_"
                     "AS2M_cpt2.pt (or without_beats=True to feed zeros, marked in describe())")
  from engine.models import convert_beats  # pylint: disable=import-outside-toplevel
  encoder = convert_beats.load(beats)
  if encoder.width != needs:
    raise ValueError(f"BEATs checkpoint {beats!r} gives {encoder.width} channels; SALMONN "
                     f"checkpoint {ckpt!r} reads {needs}")
  return encoder


def load(model: str, device: str = "cpu", dtype: str = "float32", *, whisper: str | None = None,
         llm: str | None = None, checkpoint: str | None = None, beats=None,
         without_beats: bool = False, qformer_heads: int = 12, lora_alpha: float = 32.0,
         seed: int = 0, **options) -> SalmonnAdapter:
  """'salmonn-tiny' (random, offline, with a tiny random BEATs), or real weights.

  Real weights: Whisper (`whisper`, hub id or dir, default openai/whisper-large-v2 for the
  recipes 'salmonn-13b'/'salmonn-7b'), the Vicuna LLM (`llm`), the released SALMONN
  checkpoint (`checkpoint`, a local .pth with the Q-Former, projection and LoRA weights) and
  BEATs (`beats`, the released BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt). A local
  directory holding whisper/, vicuna/, the .pth and BEATs_*.pt works as `model` too. A
  checkpoint trained with BEATs is refused without it unless `without_beats=True`, which
  feeds zeros in its channels and says so in describe(). Remaining keyword arguments are
  `SalmonnOptions` fields.
  """
  opts = _options(options)
  if FAMILY.random_match(model):
    if beats is not None:
      raise ValueError("salmonn-tiny carries its own random BEATs; drop beats=")
    tok, fe, net = build_tiny(seed, with_beats=not without_beats)
    return SalmonnAdapter(name=model, tokenizer=tok, feature_extractor=fe, model=net,
                          options=opts, device=device, dtype=dtype,
                          weights={"all": f"random seed={seed}"})
  # pylint: disable=import-outside-toplevel
  from transformers import LlamaModel, WhisperFeatureExtractor, WhisperModel
  from engine.models import convert_salmonn
  from engine.models.salmonn_tokenizer import salmonn_tokenizer
  whisper_id, llm_id, ckpt, beats = _resolve(model, whisper, llm, checkpoint, beats)
  raw = convert_salmonn.model_state(ckpt)
  audio = _beats_for(convert_salmonn.convert(raw).state, beats, without_beats, ckpt)
  torch_type = common.torch_dtype(dtype)
  encoder = WhisperModel.from_pretrained(whisper_id, dtype=torch_type).get_encoder()
  llama = LlamaModel.from_pretrained(llm_id, dtype=torch_type)
  net = convert_salmonn.build_model(raw, encoder, llama,
                                    qformer_heads=qformer_heads, lora_alpha=lora_alpha, beats=audio)
  weights = {"whisper": whisper_id, "llm": llm_id, "checkpoint": ckpt}
  weights["beats"] = os.fspath(beats) if audio is not None else None
  return SalmonnAdapter(
      name=model, tokenizer=salmonn_tokenizer(llm_id),
      feature_extractor=WhisperFeatureExtractor.from_pretrained(whisper_id), model=net,
      options=opts, device=device, dtype=dtype, weights=weights)
