"""One recipe for "audio encoder -> projector -> language model" models of transformers.

The sentence enters the language model twice, each time inside the chat template the model
expects: once as text (a user turn holding the sentence) and once as audio (a user turn holding
the clip, expanded into audio tokens by the model's own processor). Both go through the model's
real processor class, so ids, audio-token counts and features are exactly what it produces.

Sites (key = (site, layer)):
* ('audio_encoder', l), l = 0..L, speech: l=0 what enters the first encoder block (conv
  front-end + positions), l=1..L the block outputs, at the encoder's frame rate.
* ('projector', 0), speech: the projector's output, one vector per audio token, what replaces
  the audio placeholders in the language model's input.
* ('llm', l), l = 0..L, text and speech: l=0 the input embeddings, l=1..L-1 the decoder block
  outputs, l=L the final norm's output.
Masks: the content span only. Text: the tokens whose characters lie in the sentence (never the
system prompt, role headers, <|im_end|> or the generation prompt). Speech: the audio tokens
(never audio bos/eos markers or the text around them), and in the encoder the frames that hold
the clip. Right padding throughout, so a sentence's activations do not depend on its batch.

A family module (engine/models/qwen2_audio.py, ...) supplies a `Recipe`: the config model types
it claims, a tiny random build, where its modules are, how to call its body, and how its
encoder frames and audio tokens are laid out per clip (`Chunk`s).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from engine.models import bpe, common
from engine.models.base import Capture, Family, Site

ENCODER_SITE = "audio_encoder"
PROJECTOR_SITE = "projector"
LLM_SITE = "llm"
SAMPLING_RATE = 16000
SITE_MAP = {"text": LLM_SITE, "speech": (LLM_SITE, ENCODER_SITE, PROJECTOR_SITE),
            "pre_adaptor": ENCODER_SITE, "post_adaptor": PROJECTOR_SITE}
_SENTINEL = "\u2063SENTENCE\u2063"


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One row block of an encoder or projector output: which clip it belongs to, how many rows it
  holds (`stored`: the rows the model keeps, e.g. scatters into the LM) and how many of those
  are the clip's content (`content`, a prefix of `stored`)."""
  owner: int
  stored: int
  content: int


@dataclasses.dataclass(frozen=True)
class Parts:
  """Where a model's pieces are: hooks go on these modules."""
  encoder_layers: Sequence[nn.Module]
  projector: nn.Module
  lm_layers: Sequence[nn.Module]
  lm_norm: nn.Module


@dataclasses.dataclass(frozen=True)
class TypedFamily(Family):
  """A family card that claims only its random offline names: real weights are recognised by
  their config's model_type (engine.models.registry), never by a substring of their name."""

  def claims(self, model: str) -> bool:
    return self.random_match(model) is not None


def family_card(name: str, tiny_names: Sequence[str], model_types: Sequence[str]) -> TypedFamily:
  """The card of an audio-language family: the recipe's site map, its tiny names, its types."""
  pattern = "^(?:" + "|".join(n.replace(".", r"\.") for n in tiny_names) + ")$"
  return TypedFamily(name=name, random=pattern, site_map=dict(SITE_MAP),
                     model_types=tuple(model_types))


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What one model family contributes to the recipe."""
  family: Family
  build_tiny: Callable[[int], tuple[nn.Module, object]]  # seed -> (model, processor)
  model_class: Callable[[], type]  # the class from_pretrained loads
  parts: Callable[[nn.Module], Parts]
  body: Callable[[nn.Module], nn.Module]  # the module whose forward runs encoder + LM, no head
  # (adapter, processor output, clips) -> (encoder chunks, projector chunks)
  layout: Callable[[object, dict, Sequence[np.ndarray]], tuple[list[Chunk], list[Chunk]]]
  speech_inputs: Callable | None = None  # (adapter, clips) -> model inputs; default: the processor
  text_prompt: Callable | None = None  # (processor, conversation) -> str; default chat template
  processor_from_pretrained: Callable | None = None  # model -> processor; default AutoProcessor


def conversation(content: dict) -> list[dict]:
  """A single user turn holding one content item (the sentence or the clip)."""
  return [{"role": "user", "content": [content]}]


# ---------------------------------------------------------------------------------------------
# Per-clip rows.


def gather(hidden: torch.Tensor, chunks: Sequence[Chunk], clips: int) -> Capture:
  """Encoder/projector rows ([chunks, T, D] padded per chunk, or [rows, D] packed) regrouped per
  clip: [clips, T', D] with the content mask."""
  rows: list[list[torch.Tensor]] = [[] for _ in range(clips)]
  masks: list[list[torch.Tensor]] = [[] for _ in range(clips)]
  at = 0
  for i, c in enumerate(chunks):
    if hidden.dim() == 3:
      part = hidden[i, :c.stored]
    else:
      part = hidden[at:at + c.stored]
      at += c.stored
    rows[c.owner].append(part)
    masks[c.owner].append(torch.arange(c.stored, device=hidden.device) < c.content)
  if hidden.dim() == 2 and at != hidden.shape[0]:
    raise ValueError(f"packed activations hold {hidden.shape[0]} rows, the layout {at}")
  seqs = [torch.cat(r) for r in rows]
  valid = [torch.cat(m) for m in masks]
  width = max(len(s) for s in seqs)
  out = torch.stack([nn.functional.pad(s, (0, 0, 0, width - len(s))) for s in seqs])
  mask = torch.stack([nn.functional.pad(m, (0, width - len(m))) for m in valid])
  return Capture(out, mask)


def whisper_layout(mel_lengths: Sequence[int], owners: Sequence[int] | None = None):
  """(frames, tokens) chunks of a Whisper-style encoder: mel frames -> stride-2 conv -> 2x
  average pooling; chunk i belongs to clip owners[i] (default: clip i)."""
  frames, tokens = [], []
  for i, n in enumerate(int(x) for x in mel_lengths):
    owner = i if owners is None else owners[i]
    after_conv = (n - 1) // 2 + 1
    pooled = (after_conv - 2) // 2 + 1
    frames.append(Chunk(owner, after_conv, after_conv))
    tokens.append(Chunk(owner, pooled, pooled))
  return frames, tokens


# ---------------------------------------------------------------------------------------------
# The adapter.


class AudioLMAdapter(common.TorchAdapter):
  """An audio-language model behind the adapter interface, through its own processor."""

  def __init__(self, *, name: str, recipe: Recipe, model: nn.Module, processor,
               device: str = "cpu", dtype: str = "float32", weights: str = ""):
    super().__init__(name=name, tokenizer=processor.tokenizer, device=device, dtype=dtype,
                     weights=weights)
    self.family = recipe.family
    self.recipe = recipe
    self.processor = processor
    self.model = self.place(model)
    self.parts = recipe.parts(self.model)
    self.body = recipe.body(self.model)
    self._accepted = set(inspect.signature(self.body.forward).parameters)

  @property
  def audio_token_id(self) -> int:
    return int(self.processor.audio_token_id)

  def sites(self) -> list[Site]:
    n = len(self.parts.lm_layers) + 1
    return [Site(ENCODER_SITE, "speech", len(self.parts.encoder_layers) + 1),
            Site(PROJECTOR_SITE, "speech", 1), Site(LLM_SITE, "text", n),
            Site(LLM_SITE, "speech", n)]

  # -- inputs ----------------------------------------------------------------------------------

  def render(self, content: dict) -> str:
    """The chat template around one content item, as the model's processor renders it."""
    conv = conversation(content)
    if self.recipe.text_prompt is not None:
      return self.recipe.text_prompt(self.processor, conv)
    if getattr(self.processor, "chat_template", None) is None:
      raise ValueError(f"model {self.name} has no chat template (its processor has none); "
                       "load a processor that ships one")
    return self.processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

  def text_inputs(self, texts: Sequence[str]) -> tuple[dict, torch.Tensor]:
    """(processor output, [B, T] mask of the sentence's own tokens) for a text batch."""
    prefix, suffix = self.render({"type": "text", "text": _SENTINEL}).split(_SENTINEL)
    prompts, spans = [], []
    for text in texts:
      prompt = self.render({"type": "text", "text": text})
      if prompt != prefix + text + suffix:
        raise ValueError(f"the chat template of {self.name} rewrites the sentence {text[:40]!r}; "
                         "its tokens cannot be told from the template's")
      prompts.append(prompt)
      spans.append((len(prefix), len(prefix) + len(text)))
    # a family's own prompt spells its special tokens out; a chat template's output is tokenized
    # as the processor does
    kw = dict(padding=True, padding_side="right", return_tensors="pt",
              add_special_tokens=self.recipe.text_prompt is None)
    batch = self.processor(text=prompts, **kw)
    enc = self.tokenizer(prompts, return_offsets_mapping=True, **kw)
    if not torch.equal(enc["input_ids"], batch["input_ids"]):
      raise ValueError(f"the tokenizer of {self.name} does not reproduce its processor's ids")
    offsets = enc["offset_mapping"]
    lo = torch.tensor([s for s, _ in spans])[:, None]
    hi = torch.tensor([e for _, e in spans])[:, None]
    content = (offsets[..., 1] > lo) & (offsets[..., 0] < hi) & batch["attention_mask"].bool()
    content &= offsets[..., 1] > offsets[..., 0]
    empty = [t for t, row in zip(texts, content) if not bool(row.any())]
    if empty:
      raise ValueError(f"sentence {empty[0][:40]!r} has no tokens in {self.name}")
    return batch, content

  def speech_inputs(self, audios: Sequence[np.ndarray]) -> dict:
    """The processor's output for a speech batch: each clip alone in the chat template."""
    if self.recipe.speech_inputs is not None:
      return self.recipe.speech_inputs(self, audios)
    prompt = self.render({"type": "audio"})
    token = self.processor.audio_token
    if token not in prompt:
      raise ValueError(f"the chat template of {self.name} cannot hold audio: an audio turn "
                       f"renders as {prompt[:80]!r}, without the audio token {token!r}; give a "
                       "processor whose chat template renders audio content")
    clips = [np.asarray(a, np.float32) for a in audios]
    return self.processor(text=[prompt] * len(clips), audio=clips, sampling_rate=SAMPLING_RATE,
                          return_tensors="pt",
                          text_kwargs={"padding": True, "padding_side": "right"})

  # -- running ---------------------------------------------------------------------------------

  def _forward(self, batch: dict) -> dict:
    """Runs the body under hooks: {(site, layer): activations as the modules give them}."""
    got: dict = {}
    p = self.parts

    def put(key):
      return lambda value: got.__setitem__(key, value)

    outputs = {layer: put((LLM_SITE, i + 1)) for i, layer in enumerate(p.lm_layers[:-1])}
    outputs[p.lm_norm] = put((LLM_SITE, len(p.lm_layers)))
    inputs = {p.lm_layers[0]: put((LLM_SITE, 0))}
    if "input_features" in batch:
      outputs.update({layer: put((ENCODER_SITE, i + 1))
                      for i, layer in enumerate(p.encoder_layers)})
      outputs[p.projector] = put((PROJECTOR_SITE, 0))
      inputs[p.encoder_layers[0]] = put((ENCODER_SITE, 0))
    kwargs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()
              if k in self._accepted}
    if "input_features" in kwargs:
      kwargs["input_features"] = kwargs["input_features"].to(self.dtype)
    with torch.inference_mode(), common.hooks(outputs, inputs):
      self.body(**kwargs, use_cache=False)
    return got

  def run_text(self, texts: Sequence[str], language: str) -> dict[tuple[str, int], Capture]:
    del language  # one tokenizer for every language; the template names none
    batch, content = self.text_inputs(texts)
    got = self._forward(dict(batch))
    mask = content.to(self.device)
    return {key: Capture(h, mask) for key, h in got.items()}

  def run_speech(self, audios: Sequence[np.ndarray], sampling_rate: int,
                 language: str) -> dict[tuple[str, int], Capture]:
    del language
    if sampling_rate != SAMPLING_RATE:
      raise ValueError(f"{self.name} takes {SAMPLING_RATE} Hz speech; got {sampling_rate} Hz")
    batch = dict(self.speech_inputs(audios))
    frames, tokens = self.recipe.layout(self, batch, audios)
    got = self._forward(batch)
    out: dict[tuple[str, int], Capture] = {}
    for key, h in got.items():
      if key[0] == ENCODER_SITE:
        out[key] = gather(h, frames, len(audios))
    projected = gather(got[(PROJECTOR_SITE, 0)], tokens, len(audios))
    out[(PROJECTOR_SITE, 0)] = projected
    mask = self._audio_token_mask(batch["input_ids"].to(self.device), tokens)
    for key, h in got.items():
      if key[0] == LLM_SITE:
        out[key] = Capture(h, mask)
    return out

  def _audio_token_mask(self, ids: torch.Tensor, tokens: Sequence[Chunk]) -> torch.Tensor:
    """The LM positions of each clip's content audio tokens: the placeholders take the
    projector's stored rows in order, and the content prefix of each chunk counts."""
    is_audio = ids == self.audio_token_id
    mask = torch.zeros_like(is_audio)
    for b in range(ids.shape[0]):
      content = torch.cat([torch.arange(c.stored, device=ids.device) < c.content
                           for c in tokens if c.owner == b])
      at = torch.nonzero(is_audio[b]).flatten()
      if len(at) != len(content):
        raise ValueError(f"{self.name}: clip {b} has {len(at)} audio tokens in its prompt but "
                         f"the projector gives {len(content)} rows")
      mask[b, at] = content
    return mask

  def describe(self) -> dict:
    return {
        **super().describe(), "model_type": getattr(self.model.config, "model_type", None),
        "processor": type(self.processor).__name__,
        "text_prompt": self.render({"type": "text", "text": "{sentence}"}),
        "mask": "content span only: the sentence's tokens (text), the audio tokens (speech)",
        "layer_convention": "audio_encoder: 0 = block input, l = block l output; llm: 0 = input "
                            "embeddings, 1..L-1 = blocks, L = final norm output",
        "sites": [dataclasses.asdict(s) for s in self.sites()],
    }


# ---------------------------------------------------------------------------------------------
# Loading.


def load(recipe: Recipe, model: str, device: str = "cpu", dtype: str = "float32", *,
         seed: int = 0) -> AudioLMAdapter:
  """A tiny random build (a name the family card's `random` pattern matches) or real weights
  from a hub id or local directory whose config's model_type the family claims."""
  card = recipe.family
  if card.random_match(model):
    net, processor = recipe.build_tiny(seed)
    return AudioLMAdapter(name=model, recipe=recipe, model=net, processor=processor,
                          device=device, dtype=dtype, weights=f"random seed={seed}")
  from transformers import AutoConfig, AutoProcessor  # pylint: disable=import-outside-toplevel
  try:
    config = AutoConfig.from_pretrained(model)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot load model {model!r}: {e}") from None
  if config.model_type not in card.model_types:
    raise ValueError(f"{model!r} is a {config.model_type!r} model, not {card.name} "
                     f"(model types {list(card.model_types)})")
  net = recipe.model_class().from_pretrained(model, dtype=common.torch_dtype(dtype))
  processor = (recipe.processor_from_pretrained or AutoProcessor.from_pretrained)(model)
  return AudioLMAdapter(name=model, recipe=recipe, model=net, processor=processor,
                        device=device, dtype=dtype, weights=model)


def tiny_qwen2_lm(vocab_size: int) -> dict:
  """The tiny Qwen2 language model the offline Qwen2-LM families share (text_config)."""
  return dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=2048)


def projector_parts(model: nn.Module) -> Parts:
  """The layout Qwen2-Audio, Voxtral and Audio Flamingo 3 share: `model.model` holds the
  audio tower, a multi-modal projector and the language model."""
  inner = model.model
  return Parts(list(inner.audio_tower.layers), inner.multi_modal_projector,
               list(inner.language_model.layers), inner.language_model.norm)


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
  """Builds a model under a fixed seed without touching the caller's random state."""
  from transformers.utils import logging as hf_logging  # pylint: disable=import-outside-toplevel
  verbosity = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()
  try:
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(seed)
      return build().eval()
  finally:
    hf_logging.set_verbosity(verbosity)


@functools.lru_cache(maxsize=1)
def corpus_sentences() -> tuple[str, ...]:
  """The bundled corpus's sentences, read once per process (the tiny tokenizers train on them)."""
  return tuple(bpe.bundled_sentences())


@functools.lru_cache(maxsize=8)
def _byte_level_json(specials: tuple[str, ...], vocab_size: int) -> str:
  from transformers import Qwen2Tokenizer  # pylint: disable=import-outside-toplevel
  base = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[], unk_token=None, bos_token=None,
                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
  tok = base.train_new_from_iterator(corpus_sentences(), vocab_size=vocab_size,
                                     new_special_tokens=list(specials))
  return tok.backend_tokenizer.to_str()


def tiny_qwen2_tokenizer(specials: Sequence[str], vocab_size: int = 4000, **extra):
  """A real `Qwen2Tokenizer` (Qwen's pre-tokenizer and byte-level BPE) trained offline on the
  bundled corpus, with the given special tokens (deterministic, under a second once cached).
  extra: named special tokens (e.g. audio_token='<|AUDIO|>'), set as tokenizer attributes."""
  import json  # pylint: disable=import-outside-toplevel
  from transformers import Qwen2Tokenizer  # pylint: disable=import-outside-toplevel
  model = json.loads(_byte_level_json(tuple(specials), vocab_size))
  vocab = model["model"]["vocab"]
  for added in model["added_tokens"]:
    vocab[added["content"]] = added["id"]
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
            for m in model["model"]["merges"]]
  tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                       eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                       extra_special_tokens=extra or None)
  tok.add_special_tokens({"additional_special_tokens": [s for s in specials]})
  return tok
