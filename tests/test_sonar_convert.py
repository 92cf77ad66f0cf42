"""SONAR converters on synthetic checkpoints with the official fairseq2 key layout, scaled down.

Each test writes random tensors under SONAR's key names, converts them, and checks that the
weights land where they should and that the modules compute what fairseq2's modules compute
(re-derived here from the raw checkpoint tensors, independently of the converter).
"""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.models import convert_sonar, sonar, sonar_modules

D, FFN, HEADS, VOCAB, LAYERS = 16, 32, 4, 40, 2


def _ln(x, sd, prefix, eps=1e-5):
  return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _lin(x, sd, prefix):
  return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))


def _attention(q_in, kv_in, sd, prefix, heads, key_mask=None):
  """fairseq2 StandardMultiheadAttention from raw {q,k,v,output}_proj tensors; [B, T, D]."""
  b, tq, d = q_in.shape
  hd = d // heads
  split = lambda x: x.view(b, -1, heads, hd).transpose(1, 2)
  q, k, v = (split(_lin(t, sd, f"{prefix}.{n}_proj")) for t, n in ((q_in, "q"), (kv_in, "k"), (kv_in, "v")))
  scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
  if key_mask is not None:
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
  out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, tq, d)
  return _lin(out, sd, f"{prefix}.output_proj")


def _sinusoids(steps, dim):
  half = dim // 2
  freqs = torch.exp(torch.arange(half) * -math.log(10000.0) / (half - 1))
  angles = torch.outer(steps.float(), freqs)
  return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _randn(*shape, gen):
  return 0.3 * torch.randn(*shape, generator=gen)


def _linear(sd, name, out_dim, in_dim, gen, bias=True):
  sd[name + ".weight"] = _randn(out_dim, in_dim, gen=gen)
  if bias:
    sd[name + ".bias"] = _randn(out_dim, gen=gen)


def _norm(sd, name, dim, gen):
  sd[name + ".weight"] = 1 + _randn(dim, gen=gen)
  sd[name + ".bias"] = _randn(dim, gen=gen)


def _attn(sd, name, gen):
  for p in ("q_proj", "k_proj", "v_proj", "output_proj"):
    _linear(sd, f"{name}.{p}", D, D, gen)


# ---------------------------------------------------------------------------------------------
# Text encoder.


def synthetic_text_checkpoint(seed=0, vocab=VOCAB):
  gen = torch.Generator().manual_seed(seed)
  sd = {"encoder_frontend.embed.weight": _randn(vocab, D, gen=gen),
        "encoder_frontend.pos_encoder.freqs": torch.zeros(8, D)}
  for i in range(LAYERS):
    p = f"encoder.layers.{i}"
    _attn(sd, p + ".self_attn", gen)
    _norm(sd, p + ".self_attn_layer_norm", D, gen)
    _linear(sd, p + ".ffn.inner_proj", FFN, D, gen)
    _linear(sd, p + ".ffn.output_proj", D, FFN, gen)
    _norm(sd, p + ".ffn_layer_norm", D, gen)
  _norm(sd, "layer_norm", D, gen)
  return {"model": sd}


def fairseq2_text_forward(sd, f2_ids):
  """SONAR text encoder (fairseq2): scaled embeddings + sinusoids from step pad+1=2, pre-norm
  layers, closing LayerNorm; one unpadded sequence."""
  x = sd["encoder_frontend.embed.weight"][f2_ids] * math.sqrt(D)
  x = x + _sinusoids(torch.arange(len(f2_ids)) + 2, D)
  x = x[None]
  for i in range(LAYERS):
    p = f"encoder.layers.{i}"
    h = _ln(x, sd, p + ".self_attn_layer_norm")
    x = x + _attention(h, h, sd, p + ".self_attn", HEADS)
    h = _ln(x, sd, p + ".ffn_layer_norm")
    x = x + _lin(F.relu(_lin(h, sd, p + ".ffn.inner_proj")), sd, p + ".ffn.output_proj")
  return _ln(x, sd, "layer_norm")[0]


def test_text_weights_land_where_they_should():
  ckpt = synthetic_text_checkpoint()
  sd = ckpt["model"]
  enc = convert_sonar.load_text_encoder(ckpt, num_heads=HEADS)
  assert enc.config.encoder_layers == LAYERS and enc.config.d_model == D
  torch.testing.assert_close(enc.layers[1].fc1.weight, sd["encoder.layers.1.ffn.inner_proj.weight"])
  torch.testing.assert_close(enc.layers[0].self_attn.out_proj.bias,
                             sd["encoder.layers.0.self_attn.output_proj.bias"])
  torch.testing.assert_close(enc.layers[1].final_layer_norm.weight,
                             sd["encoder.layers.1.ffn_layer_norm.weight"])
  torch.testing.assert_close(enc.layer_norm.bias, sd["layer_norm.bias"])
  embed, f2 = enc.embed_tokens.weight, sd["encoder_frontend.embed.weight"]
  # transformers (<s>, <pad>, </s>, <unk>) <- fairseq2 (<pad>, <unk>, <s>, </s>); rest unchanged.
  for hf_row, f2_row in ((0, 2), (1, 0), (2, 3), (3, 1)):
    torch.testing.assert_close(embed[hf_row], f2[f2_row])
  torch.testing.assert_close(embed[4:], f2[4:])


def test_text_forward_matches_fairseq2_reference():
  ckpt = synthetic_text_checkpoint(1)
  enc = convert_sonar.load_text_encoder(ckpt, num_heads=HEADS).eval()
  hf_rows = [[30, 7, 9, 11, 5, 2], [31, 8, 2]]  # [lang] pieces </s>
  to_f2 = {0: 2, 1: 0, 2: 3, 3: 1}
  ids = torch.tensor([hf_rows[0], hf_rows[1] + [1, 1, 1]])
  mask = (ids != 1).long()
  with torch.no_grad():
    out = enc(input_ids=ids, attention_mask=mask).last_hidden_state
  for row, hf in enumerate(hf_rows):
    ref = fairseq2_text_forward(ckpt["model"], torch.tensor([to_f2.get(t, t) for t in hf]))
    torch.testing.assert_close(out[row, : len(hf)], ref, rtol=1e-4, atol=1e-4)


def test_text_checkpoint_with_foreign_keys_is_rejected():
  ckpt = synthetic_text_checkpoint()
  ckpt["model"]["decoder.layers.0.fc1.weight"] = torch.zeros(2, 2)
  with pytest.raises(ValueError, match="decoder.layers.0.fc1.weight"):
    convert_sonar.text_state_dict(ckpt)


# ---------------------------------------------------------------------------------------------
# Speech encoder.

FEAT, KERNEL, POOL_LAYERS, POOL_FFN, EMB_ROWS = 160, 5, 2, 24, 16


def synthetic_speech_checkpoint(seed=0):
  gen = torch.Generator().manual_seed(seed)
  sd = {}
  _norm(sd, "encoder_frontend.post_extract_layer_norm", FEAT, gen)
  _linear(sd, "encoder_frontend.model_dim_proj", D, FEAT, gen)
  for i in range(LAYERS):
    p = f"encoder.layers.{i}"
    for k in (1, 2):
      _norm(sd, f"{p}.ffn{k}_layer_norm", D, gen)
      _linear(sd, f"{p}.ffn{k}.inner_proj", FFN, D, gen)
      _linear(sd, f"{p}.ffn{k}.output_proj", D, FFN, gen)
    _norm(sd, p + ".self_attn_layer_norm", D, gen)
    _attn(sd, p + ".self_attn", gen)
    sd[p + ".self_attn.sdpa.r_proj.weight"] = _randn(D, D, gen=gen)
    sd[p + ".self_attn.sdpa.u_bias"] = _randn(HEADS, D // HEADS, gen=gen)
    sd[p + ".self_attn.sdpa.v_bias"] = _randn(HEADS, D // HEADS, gen=gen)
    sd[p + ".self_attn.sdpa.rel_encoder.freqs"] = torch.zeros(4, D)
    _norm(sd, p + ".conv_layer_norm", D, gen)
    sd[p + ".conv.pointwise_conv1.weight"] = _randn(2 * D, D, 1, gen=gen)
    sd[p + ".conv.depthwise_conv.weight"] = _randn(D, 1, KERNEL, gen=gen)
    _norm(sd, p + ".conv.batch_norm", D, gen)
    sd[p + ".conv.batch_norm.running_mean"] = _randn(D, gen=gen)
    sd[p + ".conv.batch_norm.running_var"] = 1 + torch.rand(D, generator=gen)
    sd[p + ".conv.batch_norm.num_batches_tracked"] = torch.tensor(7)
    sd[p + ".conv.pointwise_conv2.weight"] = _randn(D, D, 1, gen=gen)
    _norm(sd, p + ".layer_norm", D, gen)
  _norm(sd, "layer_norm", D, gen)
  sd["encoder_pooler.decoder_frontend.embed.weight"] = _randn(EMB_ROWS, D, gen=gen)
  for j in range(POOL_LAYERS):
    p = f"encoder_pooler.decoder.layers.{j}"
    _attn(sd, p + ".self_attn", gen)
    _norm(sd, p + ".self_attn_layer_norm", D, gen)
    _attn(sd, p + ".encoder_decoder_attn", gen)
    _norm(sd, p + ".encoder_decoder_attn_layer_norm", D, gen)
    _linear(sd, p + ".ffn.inner_proj", POOL_FFN, D, gen)
    _linear(sd, p + ".ffn.output_proj", D, POOL_FFN, gen)
    _norm(sd, p + ".ffn_layer_norm", D, gen)
  _linear(sd, "encoder_pooler.projection_out", D, D, gen, bias=False)
  return {"model": sd}


def fairseq2_pooler(sd, encoder_out, mask):
  """SONAR's AttentionEncoderOutputPooler: BOS (index 2) * sqrt(D) + sinusoid(0), post-norm
  decoder layers (self-attn, encoder-decoder attn, ReLU FFN), bias-free projection."""
  b = encoder_out.shape[0]
  x = sd["encoder_pooler.decoder_frontend.embed.weight"][2] * math.sqrt(D) + _sinusoids(torch.zeros(1), D)[0]
  x = x.expand(b, 1, D)
  for j in range(POOL_LAYERS):
    p = f"encoder_pooler.decoder.layers.{j}"
    x = _ln(x + _attention(x, x, sd, p + ".self_attn", HEADS), sd, p + ".self_attn_layer_norm")
    x = _ln(x + _attention(x, encoder_out, sd, p + ".encoder_decoder_attn", HEADS, mask),
            sd, p + ".encoder_decoder_attn_layer_norm")
    ffn = _lin(F.relu(_lin(x, sd, p + ".ffn.inner_proj")), sd, p + ".ffn.output_proj")
    x = _ln(x + ffn, sd, p + ".ffn_layer_norm")
  return F.linear(x, sd["encoder_pooler.projection_out.weight"])[:, 0]


def fairseq2_conformer_conv(sd, prefix, x, mask):
  """fairseq2 ConformerConvolution (batch norm, non-causal) after the block's conv_layer_norm."""
  h = _ln(x, sd, prefix + ".conv_layer_norm").masked_fill(~mask[..., None], 0.0).transpose(1, 2)
  h = F.glu(F.conv1d(h, sd[prefix + ".conv.pointwise_conv1.weight"]), dim=1)
  h = F.conv1d(h, sd[prefix + ".conv.depthwise_conv.weight"], padding=KERNEL // 2, groups=D)
  bn = prefix + ".conv.batch_norm"
  h = F.batch_norm(h, sd[bn + ".running_mean"], sd[bn + ".running_var"], sd[bn + ".weight"],
                   sd[bn + ".bias"], training=False)
  h = F.conv1d(F.silu(h), sd[prefix + ".conv.pointwise_conv2.weight"])
  return h.transpose(1, 2)


@pytest.fixture(scope="module")
def speech():
  ckpt = synthetic_speech_checkpoint()
  return ckpt["model"], convert_sonar.load_speech_encoder(ckpt, pooler_heads=HEADS)


def test_speech_config_is_read_from_shapes(speech):
  _, enc = speech
  cfg, pool_cfg = enc.w2v.config, enc.pooler.config
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (D, LAYERS, HEADS)
  assert (cfg.intermediate_size, cfg.conv_depthwise_kernel_size) == (FFN, KERNEL)
  assert cfg.feature_projection_input_dim == FEAT and cfg.position_embeddings_type == "relative"
  assert pool_cfg == sonar_modules.PoolerConfig(dim=D, layers=POOL_LAYERS, heads=HEADS, ffn_dim=POOL_FFN,
                                        num_embeddings=EMB_ROWS, bos_idx=2)


def test_speech_weights_land_where_they_should(speech):
  sd, enc = speech
  layer = enc.w2v.encoder.layers[1]
  pairs = {
      "encoder_frontend.model_dim_proj.weight": enc.w2v.feature_projection.projection.weight,
      "encoder_frontend.post_extract_layer_norm.bias": enc.w2v.feature_projection.layer_norm.bias,
      "encoder.layers.1.self_attn.q_proj.weight": layer.self_attn.linear_q.weight,
      "encoder.layers.1.self_attn.output_proj.bias": layer.self_attn.linear_out.bias,
      "encoder.layers.1.self_attn.sdpa.r_proj.weight": layer.self_attn.linear_pos.weight,
      "encoder.layers.1.self_attn.sdpa.u_bias": layer.self_attn.pos_bias_u,
      "encoder.layers.1.self_attn.sdpa.v_bias": layer.self_attn.pos_bias_v,
      "encoder.layers.1.ffn2.inner_proj.weight": layer.ffn2.intermediate_dense.weight,
      "encoder.layers.1.ffn1.output_proj.bias": layer.ffn1.output_dense.bias,
      "encoder.layers.1.conv_layer_norm.weight": layer.conv_module.layer_norm.weight,
      "encoder.layers.1.conv.batch_norm.running_var": layer.conv_module.batch_norm.running_var,
      "encoder.layers.1.conv.depthwise_conv.weight": layer.conv_module.depthwise_conv.weight,
      "encoder.layers.1.layer_norm.weight": layer.final_layer_norm.weight,
      "layer_norm.bias": enc.layer_norm.bias,
      "encoder_pooler.decoder_frontend.embed.weight": enc.pooler.embed.weight,
      "encoder_pooler.projection_out.weight": enc.pooler.proj.weight,
      "encoder_pooler.decoder.layers.1.ffn.inner_proj.weight": enc.pooler.decoder.layers[1].linear1.weight,
      "encoder_pooler.decoder.layers.0.encoder_decoder_attn_layer_norm.weight":
          enc.pooler.decoder.layers[0].norm2.weight,
  }
  for key, param in pairs.items():
    torch.testing.assert_close(param, sd[key], msg=key)
  cross = enc.pooler.decoder.layers[1].multihead_attn
  prefix = "encoder_pooler.decoder.layers.1.encoder_decoder_attn"
  torch.testing.assert_close(cross.in_proj_weight,
                             torch.cat([sd[f"{prefix}.{p}_proj.weight"] for p in "qkv"]))
  torch.testing.assert_close(cross.out_proj.bias, sd[f"{prefix}.output_proj.bias"])
  assert int(layer.conv_module.batch_norm.num_batches_tracked) == 7


def test_pooler_matches_fairseq2_reference(speech):
  sd, enc = speech
  gen = torch.Generator().manual_seed(3)
  encoder_out = torch.randn(3, 11, D, generator=gen)
  mask = torch.arange(11)[None] < torch.tensor([[11], [6], [2]])
  with torch.no_grad():
    got = enc.pooler(encoder_out, mask)
  torch.testing.assert_close(got, fairseq2_pooler(sd, encoder_out, mask), rtol=1e-4, atol=1e-4)


def test_conformer_convolution_matches_fairseq2_reference(speech):
  sd, enc = speech
  x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(4))
  mask = torch.arange(9)[None] < torch.tensor([[9], [5]])
  with torch.no_grad():
    got = enc.w2v.encoder.layers[0].conv_module(x, attention_mask=mask.long())
  want = fairseq2_conformer_conv(sd, "encoder.layers.0", x, mask)
  torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-4)


def test_speech_encoder_output_feeds_pooler(speech):
  sd, enc = speech
  features = torch.randn(2, 13, FEAT, generator=torch.Generator().manual_seed(5))
  mask = torch.arange(13)[None] < torch.tensor([[13], [8]])
  with torch.no_grad():
    hidden, embedding = enc(features, mask)
    assert len(hidden) == LAYERS + 1
    torch.testing.assert_close(embedding, fairseq2_pooler(sd, hidden[-1], mask), rtol=1e-4, atol=1e-4)
    alone_hidden, alone = enc(features[1:, :8], mask[1:, :8])
  torch.testing.assert_close(alone[0], embedding[1], rtol=1e-4, atol=1e-4)
  torch.testing.assert_close(alone_hidden[-1][0], hidden[-1][1, :8], rtol=1e-4, atol=1e-4)


# fairseq2 -> fairseq1 names (SONAR's training layout), to check the fairseq1 path.
_TO_FAIRSEQ1 = (
    (r"^encoder_frontend\.post_extract_layer_norm\.", "encoder.w2v_model.layer_norm."),
    (r"^encoder_frontend\.model_dim_proj\.", "encoder.w2v_model.post_extract_proj."),
    (r"^encoder\.layers\.(\d+)\.conv_layer_norm\.", r"E.\1.conv_module.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.conv\.", r"E.\1.conv_module."),
    (r"^encoder\.layers\.(\d+)\.ffn(\d)_layer_norm\.", r"E.\1.ffn\2.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.ffn(\d)\.inner_proj\.", r"E.\1.ffn\2.w_1."),
    (r"^encoder\.layers\.(\d+)\.ffn(\d)\.output_proj\.", r"E.\1.ffn\2.w_2."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"E.\1.self_attn_layer_norm."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"E.\1.self_attn.linear_\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.output_proj\.", r"E.\1.self_attn.linear_out."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.sdpa\.r_proj\.", r"E.\1.self_attn.linear_pos."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.sdpa\.([uv])_bias$", r"E.\1.self_attn.pos_bias_\2"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.sdpa\.rel_encoder\.freqs$", r"E.\1.freqs"),
    (r"^encoder\.layers\.(\d+)\.layer_norm\.", r"E.\1.final_layer_norm."),
    (r"^layer_norm\.", "encoder.w2v_model.encoder.layer_norm."),
    (r"^encoder_pooler\.decoder_frontend\.embed\.", "decoder.embed_tokens."),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.(self_attn|encoder_decoder_attn)\.output_proj\.",
     r"decoder.layers.\1.\2.out_proj."),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.ffn\.inner_proj\.", r"decoder.layers.\1.fc1."),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.ffn\.output_proj\.", r"decoder.layers.\1.fc2."),
    (r"^encoder_pooler\.decoder\.layers\.(\d+)\.ffn_layer_norm\.", r"decoder.layers.\1.final_layer_norm."),
    (r"^encoder_pooler\.decoder\.layers\.", "decoder.layers."),
    (r"^encoder_pooler\.projection_out\.weight$", "decoder.embed_out"),
)


def _fairseq1_name(key):
  for pattern, repl in _TO_FAIRSEQ1:
    if re.match(pattern, key):
      key = re.sub(pattern, repl, key)
      break
  key = key.replace("encoder_decoder_attn", "encoder_attn")
  return re.sub(r"^E\.", "encoder.w2v_model.encoder.layers.", key)


def test_fairseq1_layout_converts_to_the_same_weights():
  sd = synthetic_speech_checkpoint(2)["model"]
  fairseq1 = {_fairseq1_name(k): v for k, v in sd.items()}
  fairseq1["encoder.w2v_model.mask_emb"] = torch.zeros(D)
  for name, shape in (("bias", (D,)), ("weight_g", (1, 1, 8)), ("weight_v", (D, D // 4, 8))):
    fairseq1[f"encoder.w2v_model.encoder.pos_conv.0.{name}"] = torch.ones(shape)  # unused, dropped
  assert not any(k.startswith(("encoder_frontend", "encoder_pooler")) for k in fairseq1)
  a, b = convert_sonar.speech_state_dict(sd), convert_sonar.speech_state_dict({"model": fairseq1})
  assert set(a) == set(b)
  for key in a:
    torch.testing.assert_close(a[key], b[key], msg=key)


def test_adapter_runs_on_converted_checkpoint_files(tmp_path):
  tokenizer = sonar.tiny_nllb_tokenizer()
  torch.save(synthetic_text_checkpoint(vocab=len(tokenizer)), tmp_path / "text.pt")
  speech_dir = tmp_path / "speech"
  speech_dir.mkdir()
  torch.save(synthetic_speech_checkpoint(), speech_dir / "sonar_speech_encoder_deu.pt")
  adapter = sonar.SonarAdapter(
      name="synthetic", tokenizer=tokenizer,
      text_encoder=convert_sonar.load_text_encoder(str(tmp_path / "text.pt"), num_heads=HEADS),
      speech_encoders=sonar._speech_checkpoints(str(speech_dir)))  # pylint: disable=protected-access
  assert adapter.supports_language("deu", "speech") and not adapter.supports_language("eng", "speech")
  text = adapter.run_text(["Guten Tag.", "Hallo"], "deu")
  assert text[("text_encoder", LAYERS)].hidden.shape[-1] == D
  wave = np.sin(np.arange(8000) / 9.0).astype(np.float32)
  out = adapter.run_speech([wave, wave[:5000]], 16000, "deu")
  assert out[("sentence_embedding", 0)].hidden.shape == (2, 1, D)
  assert len([k for k in out if k[0] == "speech_encoder"]) == LAYERS + 1
  with pytest.raises(ValueError, match="eng"):
    adapter.run_speech([wave], 16000, "eng")
  with pytest.raises(ValueError, match="missing.pt"):
    convert_sonar.load_speech_encoder(str(tmp_path / "missing.pt"))


RELEASED_SPEECH_FILES = ["spenc.eng.pt"] + [
    f"spenc.v{v}ap.{code}.pt" for v in (3, 5) for code in sonar.SPEECH_LANGUAGES if code != "eng"]


@pytest.mark.parametrize("name", RELEASED_SPEECH_FILES)
def test_released_speech_checkpoint_names_map_to_their_language(name):
  code = name.split(".")[-2]
  assert sonar.checkpoint_language(name) == code
  assert sonar.checkpoint_language(f"/data/sonar/{name.upper()}") == code


@pytest.mark.parametrize("name,code", [
    ("sonar_speech_encoder_deu.pt", "deu"), ("deu.pt", "deu"), ("speech/spenc.v5ap.yue.pt", "yue"),
    ("spenc.v3ap.zho.pt", "cmn"), ("enc_de.pt", None), ("spenc.v3ap.pt", None),
    ("best_all.pt", None), ("model.pt", None), ("spenc.v3ap.deu.bin", None)])
def test_speech_checkpoint_names(name, code):
  if code is not None:
    assert sonar.checkpoint_language(name) == code
  else:
    with pytest.raises(ValueError, match=re.escape(repr(name.split("/")[-1]))):
      sonar.checkpoint_language(name)


def test_a_directory_of_released_checkpoints_serves_their_languages(tmp_path):
  for name in ("spenc.eng.pt", "spenc.v3ap.deu.pt", "spenc.v5ap.cmn.pt"):
    (tmp_path / name).write_bytes(b"")  # loaders are deferred: nothing is read yet
  loaders = sonar._speech_checkpoints(str(tmp_path))  # pylint: disable=protected-access
  assert sorted(loaders) == ["cmn", "deu", "eng"]
  assert loaders["deu"].path == str(tmp_path / "spenc.v3ap.deu.pt")
  (tmp_path / "sonar_speech_encoder_deu.pt").write_bytes(b"")
  with pytest.raises(ValueError, match="two SONAR speech checkpoints for language 'deu'"):
    sonar._speech_checkpoints(str(tmp_path))  # pylint: disable=protected-access


def test_text_only_adapter_reports_no_speech_site():
  tokenizer, text, _ = sonar.build_tiny(0)
  adapter = sonar.SonarAdapter(name="text only", tokenizer=tokenizer, text_encoder=text,
                               speech_encoders={})
  assert {s.modality for s in adapter.sites()} == {"text"}
  assert not adapter.supports_language("eng", "speech")
  assert adapter.supports_language("eng", "text")
