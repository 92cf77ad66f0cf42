"""SONAR checkpoints (fairseq2 key layout) -> transformers' `M2M100Encoder` and the torch modules
of engine.models.sonar_modules.

Text encoder (fairseq2 `SonarTextTransformerEncoderModel`) -> `M2M100Encoder`:
  encoder_frontend.embed            -> embed_tokens (control rows reordered, see below)
  encoder.layers.N.self_attn.{q,k,v,output}_proj -> layers.N.self_attn.{q,k,v,out}_proj
  encoder.layers.N.self_attn_layer_norm          -> layers.N.self_attn_layer_norm
  encoder.layers.N.ffn.{inner,output}_proj       -> layers.N.fc1 / fc2
  encoder.layers.N.ffn_layer_norm                -> layers.N.final_layer_norm
  layer_norm                                     -> layer_norm
fairseq2's NLLB vocabulary starts (<pad>, <unk>, <s>, </s>), transformers' NLLB tokenizer
(<s>, <pad>, </s>, <unk>); every other row (pieces, language tokens) has the same index in
both, so only the first four embedding rows move.

Speech encoder (fairseq2 `SonarSpeechEncoderModel`) -> `SonarSpeechEncoder`:
  encoder_frontend.post_extract_layer_norm / model_dim_proj -> w2v.feature_projection.layer_norm / projection
  encoder.layers.N.ffn{1,2}_layer_norm, ffn{1,2}.{inner,output}_proj
                                    -> w2v.encoder.layers.N.ffn{1,2}_layer_norm, ffn{1,2}.{intermediate,output}_dense
  encoder.layers.N.self_attn.{q,k,v,output}_proj -> ...self_attn.linear_{q,k,v,out}
  encoder.layers.N.self_attn.sdpa.{r_proj,u_bias,v_bias} -> ...self_attn.{linear_pos,pos_bias_u,pos_bias_v}
  encoder.layers.N.conv_layer_norm, conv.*       -> ...conv_module.layer_norm, conv_module.*
  encoder.layers.N.layer_norm                    -> ...final_layer_norm
  layer_norm                                     -> layer_norm (SONAR's closing LayerNorm)
  encoder_pooler.decoder_frontend.embed          -> pooler.embed
  encoder_pooler.decoder.layers.N.{self_attn,encoder_decoder_attn}.{q,k,v}_proj
                                    -> pooler.decoder.layers.N.{self_attn,multihead_attn}.in_proj_* (packed)
  ...output_proj -> out_proj; self_attn_layer_norm / encoder_decoder_attn_layer_norm /
  ffn_layer_norm -> norm1 / norm2 / norm3; ffn.{inner,output}_proj -> linear1 / linear2
  encoder_pooler.projection_out                  -> pooler.proj
Checkpoints still in the fairseq1 layout (`encoder.w2v_model.*`, `decoder.*`) are first renamed
to the fairseq2 layout, as SONAR's own loader does.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from engine.models import common
from engine.models.sonar_modules import PoolerConfig, SonarSpeechEncoder

# Rows of the fairseq2 embedding table that land at transformers' indices 0..3.
CONTROL_ROWS = (2, 0, 3, 1)

TEXT_RULES = (
    (r"^encoder_frontend\.embed\.weight$", "embed_tokens.weight"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"layers.\1.self_attn.\2_proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.output_proj\.", r"layers.\1.self_attn.out_proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"layers.\1.self_attn_layer_norm."),
    (r"^encoder\.layers\.(\d+)\.ffn\.inner_proj\.", r"layers.\1.fc1."),
    (r"^encoder\.layers\.(\d+)\.ffn\.output_proj\.", r"layers.\1.fc2."),
    (r"^encoder\.layers\.(\d+)\.ffn_layer_norm\.", r"layers.\1.final_layer_norm."),
    (r"^layer_norm\.", "layer_norm."),
)

_W2V = "w2v.encoder.layers."
_POOL = "pooler.decoder.layers."
SPEECH_RULES = (
    (r"^encoder_frontend\.post_extract_layer_norm\.", "w2v.feature_projection.layer_norm."),
    (r"^encoder_frontend\.model_dim_proj\.", "w2v.feature_projection.projection."),
    (r"^encoder\.layers\.(\d+)\.ffn([12])_layer_norm\.", _W2V + r"\1.ffn\2_layer_norm."),
    (r"^encoder\.layers\.(\d+)\.ffn([12])\.inner_proj\.", _W2V + r"\1.ffn\2.intermediate_dense."),
    (r"^encoder\.layers\.(\d+)\.ffn([12])\.output_proj\.", _W2V + r"\1.ffn\2.output_dense."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", _W2V + r"\1.self_attn_layer_norm."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", _W2V + r"\1.self_attn.linear_\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.output_proj\.", _W2V + r"\1.self_attn.linear_out."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.sdpa\.r_proj\.", _W2V + r"\1.self_attn.linear_pos."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.sdpa\.u_bias$", _W2V + r"\1.self_attn.pos_bias_u"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.sdpa\.v_bias$", _W2V + r"\1.self_attn.pos_bias_v"),
    (r"^encoder\.layers\.(\d+)\.conv_layer_norm\.", _W2V + r"\1.conv_module.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.conv\.(pointwise_conv1|depthwise_conv|batch_norm|pointwise_conv2)\.",
     _W2V + r"\1.conv_module.\2."),
    (r"^encoder\.layers\.(\d+)\.layer_norm\.", _W2V + r"\1.final_layer_norm."),
    (r"^layer_norm\.", "layer_norm."),
    (r"^encoder_pooler\.decoder_frontend\.embed\.weight$", "pooler.embed.weight"),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.",
     _POOL + r"\1.self_attn.\2_proj."),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.self_attn\.output_proj\.", _POOL + r"\1.self_attn.out_proj."),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.encoder_decoder_attn\.([qkv])_proj\.",
     _POOL + r"\1.multihead_attn.\2_proj."),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.encoder_decoder_attn\.output_proj\.",
     _POOL + r"\1.multihead_attn.out_proj."),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", _POOL + r"\1.norm1."),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.encoder_decoder_attn_layer_norm\.", _POOL + r"\1.norm2."),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.ffn_layer_norm\.", _POOL + r"\1.norm3."),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.ffn\.inner_proj\.", _POOL + r"\1.linear1."),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.ffn\.output_proj\.", _POOL + r"\1.linear2."),
    (r"^encoder_pooler\.projection_out\.weight$", "pooler.proj.weight"),
)

# fairseq1 (SONAR training code) -> fairseq2 names, for checkpoints not yet converted.
_FS1 = r"^encoder\.w2v_model\.encoder\.layers\.(\d+)\."
FAIRSEQ1_SPEECH_RULES = (
    (r"^encoder\.w2v_model\.layer_norm\.", "encoder_frontend.post_extract_layer_norm."),
    (r"^encoder\.w2v_model\.post_extract_proj\.", "encoder_frontend.model_dim_proj."),
    (_FS1 + r"conv_module\.layer_norm\.", r"encoder.layers.\1.conv_layer_norm."),
    (_FS1 + r"conv_module\.(batch_norm|depthwise_conv|pointwise_conv1|pointwise_conv2)\.",
     r"encoder.layers.\1.conv.\2."),
    (_FS1 + r"ffn([12])\.layer_norm\.", r"encoder.layers.\1.ffn\2_layer_norm."),
    (_FS1 + r"ffn([12])\.w_1\.", r"encoder.layers.\1.ffn\2.inner_proj."),
    (_FS1 + r"ffn([12])\.w_2\.", r"encoder.layers.\1.ffn\2.output_proj."),
    (_FS1 + r"self_attn_layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (_FS1 + r"self_attn\.linear_([qkv])\.", r"encoder.layers.\1.self_attn.\2_proj."),
    (_FS1 + r"self_attn\.linear_out\.", r"encoder.layers.\1.self_attn.output_proj."),
    (_FS1 + r"self_attn\.linear_pos\.", r"encoder.layers.\1.self_attn.sdpa.r_proj."),
    (_FS1 + r"self_attn\.pos_bias_([uv])$", r"encoder.layers.\1.self_attn.sdpa.\2_bias"),
    (_FS1 + r"final_layer_norm\.", r"encoder.layers.\1.layer_norm."),
    (r"^encoder\.w2v_model\.encoder\.layer_norm\.", "layer_norm."),
    (r"^decoder\.embed_tokens\.", "encoder_pooler.decoder_frontend.embed."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"encoder_pooler.decoder.layers.\1.self_attn.output_proj."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.", r"encoder_pooler.decoder.layers.\1.self_attn."),
    (r"^decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder_pooler.decoder.layers.\1.self_attn_layer_norm."),
    (r"^decoder\.layers\.(\d+)\.encoder_attn\.out_proj\.",
     r"encoder_pooler.decoder.layers.\1.encoder_decoder_attn.output_proj."),
    (r"^decoder\.layers\.(\d+)\.encoder_attn\.", r"encoder_pooler.decoder.layers.\1.encoder_decoder_attn."),
    (r"^decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.",
     r"encoder_pooler.decoder.layers.\1.encoder_decoder_attn_layer_norm."),
    (r"^decoder\.layers\.(\d+)\.fc1\.", r"encoder_pooler.decoder.layers.\1.ffn.inner_proj."),
    (r"^decoder\.layers\.(\d+)\.fc2\.", r"encoder_pooler.decoder.layers.\1.ffn.output_proj."),
    (r"^decoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder_pooler.decoder.layers.\1.ffn_layer_norm."),
    (r"^decoder\.embed_out$", "encoder_pooler.projection_out.weight"),
)

# Non-persistent or training-only entries that carry no inference weights. fairseq1 speech
# checkpoints also keep the convolutional position encoder of w2v-BERT pre-training, which the
# conformer (relative positions) never runs: SONAR's own loader deletes it too.
IGNORED = (r"\.freqs$", r"_float_tensor$", r"(^|\.)version$", r"^encoder\.w2v_model\.mask_emb$",
           r"^encoder_frontend\.masker\.",
           r"^encoder\.w2v_model\.encoder\.pos_conv\.0\.(bias|weight_g|weight_v)$")


def model_state(checkpoint) -> dict[str, torch.Tensor]:
  """A checkpoint path, a {'model': state} dict or a state dict -> the flat state dict."""
  return common.model_state(checkpoint, what="SONAR")


def rename(state: Mapping[str, torch.Tensor], rules, *, what: str,
           ignore=IGNORED) -> dict[str, torch.Tensor]:
  """Applies the first matching rule to each key; unknown keys are an error, never dropped."""
  out, unknown = {}, []
  for key, value in state.items():
    if any(re.search(p, key) for p in ignore):
      continue
    if (new := common.renamed(key, rules)) is not None:
      out[new] = value
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f"{what}: {len(unknown)} keys outside the SONAR fairseq2 layout, e.g. {unknown[:5]}")
  return out


def _layer_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
  found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
  return max(found) + 1 if found else 0


# ---------------------------------------------------------------------------------------------
# Text encoder.


def text_state_dict(checkpoint) -> dict[str, torch.Tensor]:
  """fairseq2 SONAR text encoder -> `M2M100Encoder` state dict."""
  state = rename(model_state(checkpoint), TEXT_RULES, what="SONAR text encoder checkpoint")
  embed = state["embed_tokens.weight"].clone()
  embed[: len(CONTROL_ROWS)] = state["embed_tokens.weight"][list(CONTROL_ROWS)]
  state["embed_tokens.weight"] = embed
  return state


def text_config(state: Mapping[str, torch.Tensor], *, num_heads: int = 16):
  """`M2M100Config` of a converted text state dict (heads are not recoverable from shapes)."""
  from transformers import M2M100Config  # pylint: disable=import-outside-toplevel
  vocab, dim = state["embed_tokens.weight"].shape
  layers = _layer_count(state, "layers.")
  ffn = state["layers.0.fc1.weight"].shape[0]
  return M2M100Config(
      vocab_size=vocab, d_model=dim, encoder_layers=layers, encoder_attention_heads=num_heads,
      encoder_ffn_dim=ffn, decoder_layers=1, decoder_attention_heads=num_heads,
      decoder_ffn_dim=ffn, max_position_embeddings=1024, scale_embedding=True,
      activation_function="relu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
      encoder_layerdrop=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def load_text_encoder(checkpoint, *, num_heads: int = 16):
  """fairseq2 SONAR text encoder checkpoint -> `M2M100Encoder` with its weights."""
  from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder  # pylint: disable=import-outside-toplevel
  state = text_state_dict(checkpoint)
  encoder = M2M100Encoder(text_config(state, num_heads=num_heads))
  _check_complete(encoder, state, what="SONAR text encoder", allow_missing=("embed_positions.",))
  encoder.load_state_dict(state, strict=False)
  return encoder.eval()


# ---------------------------------------------------------------------------------------------
# Speech encoder.


def _pack_pooler_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """Separate q/k/v projections -> torch MultiheadAttention's packed in_proj_{weight,bias}."""
  out = dict(state)
  for key in [k for k in state if re.search(r"\.q_proj\.(weight|bias)$", k)]:
    prefix, kind = key.rsplit(".q_proj.", 1)
    parts = [out.pop(f"{prefix}.{p}_proj.{kind}") for p in "qkv"]
    out[f"{prefix}.in_proj_{kind}"] = torch.cat(parts, dim=0)
  return out


def speech_state_dict(checkpoint) -> dict[str, torch.Tensor]:
  """fairseq2 (or fairseq1) SONAR speech encoder -> `SonarSpeechEncoder` state dict."""
  state = model_state(checkpoint)
  if any(k.startswith("encoder.w2v_model.") for k in state):
    state = rename(state, FAIRSEQ1_SPEECH_RULES, what="SONAR speech checkpoint (fairseq1 layout)")
  state = rename(state, SPEECH_RULES, what="SONAR speech encoder checkpoint")
  state = _pack_pooler_attention(state)
  for key in [k for k in state if k.endswith("batch_norm.running_mean")]:
    state.setdefault(key.replace("running_mean", "num_batches_tracked"), torch.tensor(0))
  return state


def speech_config(state: Mapping[str, torch.Tensor], *, pooler_heads: int = 16):
  """(Wav2Vec2BertConfig, PoolerConfig) of a converted speech state dict."""
  from transformers import Wav2Vec2BertConfig  # pylint: disable=import-outside-toplevel
  proj = state["w2v.feature_projection.projection.weight"]
  dim, feature_dim = proj.shape
  layer0 = _W2V + "0."
  config = Wav2Vec2BertConfig(
      hidden_size=dim, num_hidden_layers=_layer_count(state, _W2V),
      num_attention_heads=state[layer0 + "self_attn.pos_bias_u"].shape[0],
      intermediate_size=state[layer0 + "ffn1.intermediate_dense.weight"].shape[0],
      feature_projection_input_dim=feature_dim, position_embeddings_type="relative",
      conv_depthwise_kernel_size=state[layer0 + "conv_module.depthwise_conv.weight"].shape[-1],
      max_source_positions=5000, hidden_act="swish", hidden_dropout=0.0, activation_dropout=0.0,
      attention_dropout=0.0, feat_proj_dropout=0.0, conformer_conv_dropout=0.0, layerdrop=0.0,
      mask_time_prob=0.0, add_adapter=False, use_intermediate_ffn_before_adapter=False)
  embed = state["pooler.embed.weight"]
  pooler = PoolerConfig(
      dim=embed.shape[1], layers=_layer_count(state, _POOL), heads=pooler_heads,
      ffn_dim=state[_POOL + "0.linear1.weight"].shape[0], num_embeddings=embed.shape[0])
  return config, pooler


def load_speech_encoder(checkpoint, *, pooler_heads: int = 16) -> SonarSpeechEncoder:
  """fairseq2 SONAR speech encoder checkpoint -> `SonarSpeechEncoder` with its weights."""
  state = speech_state_dict(checkpoint)
  config, pooler = speech_config(state, pooler_heads=pooler_heads)
  encoder = SonarSpeechEncoder(config, pooler)
  _check_complete(encoder, state, what="SONAR speech encoder")
  encoder.load_state_dict(state, strict=False)
  return encoder.eval()


def _check_complete(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str,
                    allow_missing=()) -> None:
  """Every converted tensor has a home and every parameter/persistent buffer got a value."""
  expected = module.state_dict()
  unexpected = sorted(set(state) - set(expected))
  missing = sorted(k for k in set(expected) - set(state) if not k.startswith(tuple(allow_missing)))
  if unexpected or missing:
    raise ValueError(f"{what}: converted checkpoint does not fit the module; "
                     f"unexpected {unexpected[:5]}, missing {missing[:5]}")
  bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
  if bad:
    raise ValueError(f"{what}: shape mismatch for {bad[:5]}")
