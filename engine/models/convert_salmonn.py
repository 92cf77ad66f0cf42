"""The released SALMONN checkpoint -> `engine.models.salmonn_modules.SalmonnModel`.

SALMONN's .pth (`{'model': state}`) holds only what SALMONN trained; Whisper, BEATs and
Vicuna come from their own releases. Key mapping (LAVIS BERT Q-Former -> transformers
`Blip2QFormerModel`, peft LoRA on `LlamaForCausalLM` -> peft LoRA on `LlamaModel`):
  speech_Qformer.bert.embeddings.LayerNorm.*                 -> qformer.layernorm.*
  speech_Qformer.bert.encoder.layer.N.{attention,crossattention}.self.{query,key,value}.*
                                                             -> qformer.encoder.layer.N.{...}.attention.{...}.*
  speech_Qformer.bert.encoder.layer.N.{attention,crossattention}.output.{dense,LayerNorm}.*
                                                             -> qformer.encoder.layer.N.{...}.output.{...}.*
  speech_Qformer.bert.encoder.layer.N.{intermediate,output}_query.*  -> same under qformer.
  speech_query_tokens                                        -> query_tokens
  speech_llama_proj.*                                        -> proj.*
  ln_speech.*, ln_audio.*                                    -> same
  speech_encoder.* (Whisper encoder, if saved)               -> whisper.*
  llama_model.base_model.model.model.layers.N.<path>.lora_{A,B}[.default].weight
                                                             -> llm.base_model.model.layers.N.<path>.lora_{A,B}.default.weight
Dropped on purpose (and listed in the report): the Q-Former's unused text branch
(`.intermediate.`, `.output.` of each layer, `cls.*`, `position_ids`), BEATs weights and any
non-LoRA LLaMA weights (Vicuna is loaded from its own checkpoint). SALMONN's .pth holds no BEATs
weights of its own (BEATs is frozen); the released BEATs checkpoint comes in through
`engine.models.convert_beats` and `build_model(beats=...)`.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Mapping

import torch

from engine.models import common
from engine.models.salmonn_modules import SalmonnModel

_QF = r"^speech_Qformer\.bert\.encoder\.layer\.(\d+)\."
RULES = (
    (r"^speech_Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (_QF + r"(attention|crossattention)\.self\.", r"qformer.encoder.layer.\1.\2.attention."),
    (_QF + r"(attention|crossattention)\.output\.", r"qformer.encoder.layer.\1.\2.output."),
    (_QF + r"(intermediate_query|output_query)\.", r"qformer.encoder.layer.\1.\2."),
    (r"^speech_query_tokens$", "query_tokens"),
    (r"^speech_llama_proj\.", "proj."),
    (r"^ln_speech\.", "ln_speech."),
    (r"^ln_audio\.", "ln_audio."),
    (r"^speech_encoder\.", "whisper."),
    (r"^llama_model\.base_model\.model\.model\.(layers\.\d+\.[\w.]+?\.lora_[AB])(?:\.default)?\.weight$",
     r"llm.base_model.model.\1.default.weight"),
)
DROPPED = (
    r"^speech_Qformer\.bert\.embeddings\.(position_ids|word_embeddings|position_embeddings)",
    r"^speech_Qformer\.cls\.",
    _QF + r"(intermediate|output)\.",
    r"^beats\.",
    r"^llama_model\.",
)


def model_state(checkpoint) -> dict[str, torch.Tensor]:
  """A SALMONN .pth path, a {'model': state} dict or a state dict -> the flat state dict."""
  return common.model_state(checkpoint, what="SALMONN")


@dataclasses.dataclass
class Converted:
  """Renamed tensors for `SalmonnModel` and the checkpoint keys deliberately left out."""
  state: dict[str, torch.Tensor]
  dropped: list[str]


def convert(state: Mapping[str, torch.Tensor]) -> Converted:
  """Renames every key; a key that is neither mapped nor knowingly dropped is an error."""
  out, dropped, unknown = {}, [], []
  for key, value in state.items():
    if (new := common.renamed(key, RULES)) is not None:
      out[new] = value
    else:
      (dropped if any(re.match(p, key) for p in DROPPED) else unknown).append(key)
  if unknown:
    raise ValueError(f"SALMONN checkpoint: {len(unknown)} keys outside the released layout, "
                     f"e.g. {unknown[:5]}")
  return Converted(out, dropped)


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Architecture facts readable from the checkpoint's tensor shapes."""
  qformer_layers: int
  qformer_hidden: int
  qformer_intermediate: int
  qformer_width: int
  num_query_tokens: int
  whisper_dim: int
  beats_dim: int
  llm_hidden: int
  lora_rank: int
  lora_targets: tuple[str, ...]


def shapes(state: Mapping[str, torch.Tensor]) -> Shapes:
  """Reads sizes from a converted state dict (the `Converted.state`)."""
  layers = {int(m.group(1)) for k in state if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.", k))}
  if "query_tokens" not in state or not layers:
    raise ValueError("SALMONN checkpoint has no speech_Qformer / speech_query_tokens weights")
  lora_a = [k for k in state if k.endswith("lora_A.default.weight")]
  targets = sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in lora_a})
  proj = state["proj.weight"]
  return Shapes(
      qformer_layers=max(layers) + 1,
      qformer_hidden=state["query_tokens"].shape[-1],
      qformer_intermediate=state["qformer.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
      qformer_width=state["qformer.encoder.layer.0.crossattention.attention.key.weight"].shape[1],
      num_query_tokens=state["query_tokens"].shape[1],
      whisper_dim=state["ln_speech.weight"].shape[0],
      beats_dim=state["ln_audio.weight"].shape[0] if "ln_audio.weight" in state else 0,
      llm_hidden=proj.shape[0],
      lora_rank=state[lora_a[0]].shape[0] if lora_a else 0,
      lora_targets=tuple(targets))


def build_model(checkpoint, whisper: torch.nn.Module, llama: torch.nn.Module, *,
                qformer_heads: int = 12, lora_alpha: float = 32.0,
                beats: torch.nn.Module | None = None) -> SalmonnModel:
  """SalmonnModel around pretrained Whisper encoder and `LlamaModel`, with the checkpoint's
  Q-Former, projection, layer norms and LoRA weights. Heads and LoRA alpha are not in the
  shapes: SALMONN uses BERT-base's 12 heads and lora_alpha=32. `beats`: the BEATs encoder
  (`engine.models.beats.Beats`) a checkpoint with ln_audio reads; None feeds zeros."""
  # pylint: disable=import-outside-toplevel
  import peft
  from transformers import Blip2QFormerConfig, Blip2QFormerModel
  converted = convert(model_state(checkpoint))
  s = shapes(converted.state)
  if s.whisper_dim != whisper.config.d_model:
    raise ValueError(f"checkpoint expects {s.whisper_dim}-dim Whisper features, the Whisper "
                     f"encoder gives {whisper.config.d_model}")
  if s.llm_hidden != llama.config.hidden_size:
    raise ValueError(f"checkpoint projects to {s.llm_hidden} dims, the LLM has {llama.config.hidden_size}")
  qformer = Blip2QFormerModel(Blip2QFormerConfig(
      hidden_size=s.qformer_hidden, num_hidden_layers=s.qformer_layers,
      num_attention_heads=qformer_heads, intermediate_size=s.qformer_intermediate,
      cross_attention_frequency=1, encoder_hidden_size=s.qformer_width,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12))
  if s.lora_rank:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", FutureWarning)  # peft probing a deprecated transformers API
      llama = peft.get_peft_model(llama, peft.LoraConfig(
          r=s.lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
          target_modules=list(s.lora_targets)))
  model = SalmonnModel(whisper, qformer, llama, num_query_tokens=s.num_query_tokens,
                       beats_dim=s.beats_dim, beats=beats)
  load_into(model, converted)
  return model.eval()


def load_into(model: torch.nn.Module, converted: Converted) -> None:
  """Loads the converted tensors; each must land on a parameter of the same shape."""
  expected = model.state_dict()
  unexpected = sorted(set(converted.state) - set(expected))
  if unexpected:
    raise ValueError(f"SALMONN checkpoint tensors with no place in the model: {unexpected[:5]}")
  bad = [k for k, v in converted.state.items() if tuple(v.shape) != tuple(expected[k].shape)]
  if bad:
    raise ValueError(f"SALMONN checkpoint shape mismatch for {bad[:5]}")
  trained = [k for k in expected if k.startswith(("qformer.", "query_tokens", "proj.", "ln_"))
             or ".lora_" in k]
  missing = sorted(set(trained) - set(converted.state))
  if missing:
    raise ValueError(f"SALMONN checkpoint lacks trained weights {missing[:5]}")
  model.load_state_dict(converted.state, strict=False)
