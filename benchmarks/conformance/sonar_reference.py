"""SONAR's own side of the conformance check; runs inside the sonar-space/fairseq2 environment
(it must not import the project).

Reads WORK/inputs.npz (token ids in fairseq2's vocabulary order, waveforms), builds tiny random
SONAR text and speech encoders with SONAR's own config classes and factories, saves them as
fairseq2 checkpoints (WORK/sonar_text_encoder.pt, WORK/speech/spenc.eng.pt, and the speech one
again in SONAR's fairseq1 training layout as WORK/speech_fairseq1/spenc.v3ap.eng.pt), and writes
every layer output and sentence embedding to WORK/reference.npz.

  python sonar_reference.py WORK
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from importlib import metadata

# This directory holds the project's sonar.py, which would shadow SONAR's package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position

from fairseq2.data.audio import WaveformToFbankConverter
from fairseq2.data.tokenizers import VocabularyInfo
from fairseq2.models.transformer import TransformerNormOrder
from fairseq2.models.w2vbert import W2VBertConfig
from fairseq2.nn import BatchLayout
from sonar.inference_pipelines.speech import SpeechToEmbeddingModelPipeline
from sonar.models.sonar_speech import (SonarSpeechEncoderConfig, SonarSpeechEncoderFactory,
                                       _convert_sonar_speech_checkpoint)
from sonar.models.sonar_text import (SonarTextEncoderConfig, SonarTextEncoderFactory,
                                     _convert_sonar_text_encoder_checkpoint)

SEED = 0
DIM, LAYERS, HEADS, FFN = 64, 3, 16, 128  # SONAR's 16 heads, as the converter assumes
POOLER_LAYERS, KERNEL = 2, 7


def text_config(vocab_size: int) -> SonarTextEncoderConfig:
  """SONAR's 'basic' text encoder config (NLLB vocabulary layout, mean pooling), scaled down."""
  return SonarTextEncoderConfig(
      model_dim=DIM, max_seq_len=64,
      vocab_info=VocabularyInfo(size=vocab_size, unk_idx=1, bos_idx=2, eos_idx=3, pad_idx=1),
      num_encoder_layers=LAYERS, num_decoder_layers=LAYERS, num_encoder_attn_heads=HEADS,
      num_decoder_attn_heads=HEADS, ffn_inner_dim=FFN, pooling="mean", learned_pos=False,
      no_scale_embedding=False, no_token_positional_embeddings=False, activation_fn="ReLU",
      normalize_before=False, emb_dropout_p=0.0, attention_dropout_p=0.0,
      activation_dropout_p=0.0, _from_fairseq=True)


def speech_config() -> SonarSpeechEncoderConfig:
  """SONAR's 'non_english' speech encoder config (w2v-BERT 600m encoder), scaled down."""
  encoder = dataclasses.replace(
      W2VBertConfig().w2v2_config.encoder_config, model_dim=DIM, num_encoder_layers=LAYERS,
      num_encoder_attn_heads=HEADS, ffn_inner_dim=FFN, depthwise_conv_kernel_size=KERNEL)
  return SonarSpeechEncoderConfig(
      w2v2_encoder_config=encoder, final_dropout_p=0.1, model_dim=DIM, max_seq_len=1024,
      pad_idx=1, bos_idx=2, num_decoder_layers=POOLER_LAYERS, num_decoder_attn_heads=HEADS,
      decoder_norm_order=TransformerNormOrder.POST, ffn_inner_dim=FFN, dropout_p=0.1)


def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
  """Random offsets on every parameter (LayerNorm gains and biases included) and random
  BatchNorm statistics, so no layer is the identity."""
  with torch.no_grad():
    for _, p in sorted(model.named_parameters()):
      p.add_((0.1 if p.dim() == 1 else 0.02) * torch.randn(p.shape, generator=generator))
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm1d):
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
        m.running_var.copy_(1.0 + 0.2 * torch.rand(m.running_var.shape, generator=generator))


def _first(output):
  return output[0] if isinstance(output, (tuple, list)) else output


def run_with_layers(model, seqs, layout):
  """SONAR's forward with the site outputs: frontend, blocks 0..L-2, final LayerNorm."""
  states = {}
  handles = [model.encoder_frontend.register_forward_hook(
      lambda m, i, o: states.__setitem__(0, _first(o)))]
  for n, layer in enumerate(model.encoder.layers):
    handles.append(layer.register_forward_hook(
        lambda m, i, o, n=n: states.__setitem__(n + 1, _first(o))))
  try:
    with torch.inference_mode():
      out = model(seqs, layout)
  finally:
    for h in handles:
      h.remove()
  layers = [states[n] for n in range(len(model.encoder.layers))] + [out.encoded_seqs]
  return layers, out.sentence_embeddings


# SONAR's fairseq1 -> fairseq2 speech key map (sonar.models.sonar_speech.checkpoint), inverted
# here to write a checkpoint in the training layout; SONAR's converter then reads it back.
_L = r"encoder.w2v_model.encoder.layers.\1."
_P = r"^encoder_pooler\.decoder\.layers\.(\d+)\."
FS2_TO_FS1 = (
    (r"^encoder_frontend\.post_extract_layer_norm\.", "encoder.w2v_model.layer_norm."),
    (r"^encoder_frontend\.model_dim_proj\.", "encoder.w2v_model.post_extract_proj."),
    (r"^encoder\.layers\.(\d+)\.conv\.", _L + r"conv_module."),
    (r"^encoder\.layers\.(\d+)\.conv_layer_norm\.", _L + r"conv_module.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.ffn([12])_layer_norm\.", _L + r"ffn\2.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.ffn([12])\.inner_proj\.", _L + r"ffn\2.w_1."),
    (r"^encoder\.layers\.(\d+)\.ffn([12])\.output_proj\.", _L + r"ffn\2.w_2."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", _L + r"self_attn_layer_norm."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", _L + r"self_attn.linear_\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.output_proj\.", _L + r"self_attn.linear_out."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.sdpa\.r_proj\.", _L + r"self_attn.linear_pos."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.sdpa\.([uv])_bias$", _L + r"self_attn.pos_bias_\2"),
    (r"^encoder\.layers\.(\d+)\.layer_norm\.", _L + r"final_layer_norm."),
    (r"^layer_norm\.", "encoder.w2v_model.encoder.layer_norm."),
    (r"^encoder_pooler\.decoder_frontend\.embed\.", "decoder.embed_tokens."),
    (_P + r"self_attn_layer_norm\.", r"decoder.layers.\1.self_attn_layer_norm."),
    (_P + r"self_attn\.output_proj\.", r"decoder.layers.\1.self_attn.out_proj."),
    (_P + r"self_attn\.", r"decoder.layers.\1.self_attn."),
    (_P + r"encoder_decoder_attn_layer_norm\.", r"decoder.layers.\1.encoder_attn_layer_norm."),
    (_P + r"encoder_decoder_attn\.output_proj\.", r"decoder.layers.\1.encoder_attn.out_proj."),
    (_P + r"encoder_decoder_attn\.", r"decoder.layers.\1.encoder_attn."),
    (_P + r"ffn\.inner_proj\.", r"decoder.layers.\1.fc1."),
    (_P + r"ffn\.output_proj\.", r"decoder.layers.\1.fc2."),
    (_P + r"ffn_layer_norm\.", r"decoder.layers.\1.final_layer_norm."),
    (r"^encoder_pooler\.projection_out\.weight$", "decoder.embed_out"),
)


def fairseq1_state(state: dict, generator: torch.Generator) -> dict:
  out = {}
  for key, value in state.items():
    for pattern, repl in FS2_TO_FS1:
      if re.match(pattern, key):
        out[re.sub(pattern, repl, key)] = value
        break
    else:
      raise KeyError(f"no fairseq1 name for {key}")
  # Training-only entries that SONAR's loader deletes.
  out["encoder.w2v_model.mask_emb"] = torch.randn(160, generator=generator)
  out["encoder.w2v_model.encoder.pos_conv.0.bias"] = torch.randn(DIM, generator=generator)
  out["encoder.w2v_model.encoder.pos_conv.0.weight_g"] = torch.randn(1, 1, 8, generator=generator)
  out["encoder.w2v_model.encoder.pos_conv.0.weight_v"] = torch.randn(DIM, 2, 8, generator=generator)
  return out


def max_diff(a: dict, b: dict) -> float:
  return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(work: str) -> None:
  torch.set_num_threads(1)
  inputs = np.load(os.path.join(work, "inputs.npz"))
  generator = torch.Generator().manual_seed(SEED)
  out: dict[str, np.ndarray] = {}
  checks = {}

  # -- text ----------------------------------------------------------------------------------
  torch.manual_seed(SEED)
  text = SonarTextEncoderFactory(text_config(int(inputs["vocab_size"]))).create_model().eval()
  perturb(text, generator)
  text_path = os.path.join(work, "sonar_text_encoder.pt")
  torch.save({"model": text.state_dict()}, text_path)
  reloaded = SonarTextEncoderFactory(text_config(int(inputs["vocab_size"]))).create_model()
  reloaded.load_state_dict(_convert_sonar_text_encoder_checkpoint(
      torch.load(text_path, weights_only=True), reloaded), strict=True)
  checks["text_checkpoint_reload"] = max_diff(text.state_dict(), reloaded.state_dict())
  for name in [k for k in inputs if k.startswith("text_ids_")]:
    tag = name[len("text_ids_"):]
    ids = torch.from_numpy(inputs[name]).long()
    lens = inputs[f"text_lens_{tag}"].tolist()
    layers, embedding = run_with_layers(text, ids, BatchLayout.of(ids, lens))
    for l, h in enumerate(layers):
      out[f"text_{tag}_layer{l}"] = h.numpy()
    out[f"text_{tag}_embedding"] = embedding.numpy()

  # -- speech --------------------------------------------------------------------------------
  torch.manual_seed(SEED + 1)
  speech = SonarSpeechEncoderFactory(speech_config()).create_model().eval()
  perturb(speech, generator)
  state = speech.state_dict()
  os.makedirs(os.path.join(work, "speech"), exist_ok=True)
  speech_path = os.path.join(work, "speech", "spenc.eng.pt")
  torch.save({"model": state}, speech_path)
  fs1 = fairseq1_state(state, generator)
  os.makedirs(os.path.join(work, "speech_fairseq1"), exist_ok=True)
  torch.save({"model": fs1}, os.path.join(work, "speech_fairseq1", "spenc.v3ap.eng.pt"))
  back = _convert_sonar_speech_checkpoint({"model": dict(fs1)}, speech_config())
  back = back.get("model", back)
  if set(back) != set(state):
    raise SystemExit(f"fairseq1 layout does not round-trip through SONAR's converter: "
                     f"{sorted(set(back) ^ set(state))[:5]}")
  checks["speech_fairseq1_roundtrip_through_sonar_converter"] = max_diff(state, back)
  reloaded = SonarSpeechEncoderFactory(speech_config()).create_model()
  reloaded.load_state_dict(_convert_sonar_speech_checkpoint(
      torch.load(speech_path, weights_only=True), speech_config()), strict=True)
  checks["speech_checkpoint_reload"] = max_diff(state, reloaded.state_dict())

  lengths = inputs["wave_lens"].tolist()
  waves = [torch.from_numpy(inputs["waves"][i, :n]).float() for i, n in enumerate(lengths)]
  # SONAR's fbank front end and batching (sonar.inference_pipelines.speech).
  to_fbank = WaveformToFbankConverter(num_mel_bins=80, waveform_scale=2**15, channel_last=True,
                                      standardize=True, dtype=torch.float32)
  fbanks = [to_fbank({"waveform": w.unsqueeze(1), "sample_rate": 16000.0})["fbank"] for w in waves]
  frames = [f.shape[0] for f in fbanks]
  width = max(frames) + max(frames) % 2  # Collater(pad_value=0, pad_to_multiple=2)
  seqs = torch.zeros(len(fbanks), width, 80)
  for i, f in enumerate(fbanks):
    seqs[i, : f.shape[0]] = f
  layers, embedding = run_with_layers(speech, seqs, BatchLayout.of(seqs, frames))
  for l, h in enumerate(layers):
    out[f"speech_layer{l}"] = h.numpy()
  out["speech_embedding"] = embedding.numpy()
  out["speech_fbank"] = seqs.numpy()
  out["speech_frames"] = np.array(frames)
  pipeline = SpeechToEmbeddingModelPipeline(encoder=speech)
  out["speech_pipeline_embedding"] = pipeline.predict(
      [w.unsqueeze(0) for w in waves], batch_size=len(waves)).numpy()

  # The language tokens of SONAR's text tokenizer, in the order fairseq2 appends them.
  import sonar  # pylint: disable=import-outside-toplevel
  from ruamel.yaml import YAML  # pylint: disable=import-outside-toplevel
  card = os.path.join(os.path.dirname(sonar.__file__), "cards", "text_sonar_basic_encoder.yaml")
  with open(card, encoding="utf-8") as f:
    langs = YAML(typ="safe").load(f)["tokenizer_config"]["_set_"]["langs"]

  np.savez(os.path.join(work, "reference.npz"), **out)
  versions = {p: metadata.version(p) for p in ("sonar-space", "fairseq2", "fairseq2n", "torch",
                                                "torchaudio")}
  versions["torch_cuda_build"] = torch.version.cuda
  with open(os.path.join(work, "reference.json"), "w") as f:
    json.dump({"versions": versions, "checks": checks, "nllb_langs": langs,
               "config": {"dim": DIM, "layers": LAYERS, "heads": HEADS, "ffn": FFN,
                          "pooler_layers": POOLER_LAYERS, "kernel": KERNEL}}, f, indent=2)
  print(json.dumps({"versions": versions, "checks": checks}))


if __name__ == "__main__":
  main(sys.argv[1])
