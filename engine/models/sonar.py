"""SONAR's text and speech encoders seen as sites of activations.

SONAR (Duquenne et al. 2023) trains a text encoder and per-language speech encoders into one
fixed-size sentence space. Both encoders are rebuilt here from transformers/torch components:

* text: `M2M100Encoder` (NLLB-style pre-norm transformer, input `[lang] tokens </s>`), then
  masked mean pooling over every non-pad token of the final layer-normed output;
* speech: `Wav2Vec2BertModel` (w2v-BERT conformer over 160-dim stacked fbanks) whose
  convolution modules are SONAR's (BatchNorm, symmetric 'same' padding), a closing LayerNorm,
  then an attention pooler: a post-norm transformer decoder fed a single BOS token that
  cross-attends to the encoder output, followed by a bias-free linear.

Sites (key = (site, layer)):
* ('text_encoder', l), l = 0..L: l=0 is the embedding output (scaled tokens + positions),
  l=1..L-1 the block outputs, l=L the final layer-normed output (what SONAR pools); this is
  transformers' `output_hidden_states` convention.
* ('speech_encoder', l), l = 0..L: l=0 is the feature projection output, l=1..L-1 conformer
  block outputs, l=L the output of the closing LayerNorm (what the pooler attends to).
* ('sentence_embedding', 0) for both modalities: SONAR's sentence vector, T=1, mask all True.
Text masks cover every non-pad token including the language token and </s>, as SONAR pools
them, so mean pooling of ('text_encoder', L) equals the text sentence embedding.

Models: 'sonar-tiny' is a seeded random config of the same classes with an offline
`NllbTokenizer` (NLLB special tokens and language codes over the BPE SeamlessM4T's tiny
tokenizer learns on the bundled corpus) and one speech encoder shared by every language; real
weights are the transformers port of the text encoder (`from_pretrained`) or fairseq2
checkpoints converted by engine.models.convert_sonar, one speech encoder per language.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import math
import os
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from engine.models import seamless
from engine.models.base import Adapter, Capture, Site

TEXT_SITE = "text_encoder"
SPEECH_SITE = "speech_encoder"
EMBEDDING_SITE = "sentence_embedding"
SAMPLING_RATE = 16000
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Embedding rows of the tiny text encoder: fixed (>= BPE vocabulary + NLLB language codes +
# <mask>), so the random weights never depend on what the bundled corpus holds.
TINY_VOCAB = 37888

# Canonical (SeamlessM4T) code -> NLLB/FLoRes code, used until engine.data.languages provides it.
_NLLB = {
    "afr": "afr_Latn", "amh": "amh_Ethi", "arb": "arb_Arab", "azj": "azj_Latn", "bel": "bel_Cyrl",
    "ben": "ben_Beng", "bul": "bul_Cyrl", "cat": "cat_Latn", "ces": "ces_Latn", "cmn": "zho_Hans",
    "cym": "cym_Latn", "dan": "dan_Latn", "deu": "deu_Latn", "ell": "ell_Grek", "eng": "eng_Latn",
    "est": "est_Latn", "eus": "eus_Latn", "fin": "fin_Latn", "fra": "fra_Latn", "gaz": "gaz_Latn",
    "gle": "gle_Latn", "glg": "glg_Latn", "guj": "guj_Gujr", "hau": "hau_Latn", "heb": "heb_Hebr",
    "hin": "hin_Deva", "hrv": "hrv_Latn", "hun": "hun_Latn", "hye": "hye_Armn", "ibo": "ibo_Latn",
    "ind": "ind_Latn", "isl": "isl_Latn", "ita": "ita_Latn", "jav": "jav_Latn", "jpn": "jpn_Jpan",
    "kan": "kan_Knda", "kat": "kat_Geor", "kaz": "kaz_Cyrl", "khk": "khk_Cyrl", "khm": "khm_Khmr",
    "kir": "kir_Cyrl", "kor": "kor_Hang", "lao": "lao_Laoo", "lit": "lit_Latn", "lug": "lug_Latn",
    "luo": "luo_Latn", "lvs": "lvs_Latn", "mal": "mal_Mlym", "mar": "mar_Deva", "mkd": "mkd_Cyrl",
    "mlt": "mlt_Latn", "mya": "mya_Mymr", "nld": "nld_Latn", "nob": "nob_Latn", "npi": "npi_Deva",
    "nya": "nya_Latn", "ory": "ory_Orya", "pan": "pan_Guru", "pbt": "pbt_Arab", "pes": "pes_Arab",
    "pol": "pol_Latn", "por": "por_Latn", "ron": "ron_Latn", "rus": "rus_Cyrl", "slk": "slk_Latn",
    "slv": "slv_Latn", "sna": "sna_Latn", "snd": "snd_Arab", "som": "som_Latn", "spa": "spa_Latn",
    "srp": "srp_Cyrl", "swe": "swe_Latn", "swh": "swh_Latn", "tam": "tam_Taml", "tel": "tel_Telu",
    "tgk": "tgk_Cyrl", "tgl": "tgl_Latn", "tha": "tha_Thai", "tur": "tur_Latn", "ukr": "ukr_Cyrl",
    "urd": "urd_Arab", "uzn": "uzn_Latn", "vie": "vie_Latn", "wol": "wol_Latn", "xho": "xho_Latn",
    "yor": "yor_Latn", "yue": "yue_Hant", "zlm": "zsm_Latn", "zsm": "zsm_Latn", "zul": "zul_Latn",
}


def nllb_code(language: str) -> str:
  """Language code -> NLLB code ('eng' -> 'eng_Latn'): engine.data's table (any alias it
  accepts), then SONAR's wider set of canonical codes."""
  from engine.data import languages  # pylint: disable=import-outside-toplevel
  try:
    return languages.get_language(language).nllb
  except ValueError:
    pass
  if language in _NLLB:
    return _NLLB[language]
  raise ValueError(f"no NLLB code known for language {language!r}; use a canonical code like 'eng'")


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
  if isinstance(dtype, torch.dtype):
    return dtype
  if dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
  return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# Offline tokenizer for the tiny config.


def bundled_bpe() -> tuple[list[str], list[tuple[str, str]]]:
  """(tokens, merges) of the BPE that SeamlessM4T's offline tokenizer learns on the bundled
  corpus over a fixed all-scripts alphabet (shared, so the tiny models of all families cut
  sentences the same way); its four special tokens come first."""
  model = json.loads(seamless._tiny_tokenizer_json(seamless.TINY_MERGES))["model"]  # pylint: disable=protected-access
  tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
  return tokens, merges


def tiny_nllb_tokenizer():
  """A real `NllbTokenizer` built offline: NLLB's special tokens (<s>=0, <pad>=1, </s>=2,
  <unk>=3) and language codes (eng_Latn, ...) over the bundled-corpus BPE."""
  from tokenizers import Regex, normalizers  # pylint: disable=import-outside-toplevel
  from transformers import NllbTokenizer  # pylint: disable=import-outside-toplevel
  tokens, merges = bundled_bpe()
  vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  tokenizer = NllbTokenizer(vocab=vocab, merges=merges)
  # NFKC, as NLLB's SentencePiece normaliser (and the BPE's training) does: full-width
  # punctuation and compatibility forms map into the alphabet.
  tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
      [normalizers.Replace(Regex(r"[\n\r\t]"), " "), normalizers.NFKC()])
  if len(tokenizer) > TINY_VOCAB:
    raise ValueError(f"offline NLLB tokenizer has {len(tokenizer)} tokens, more than TINY_VOCAB")
  return tokenizer


# ---------------------------------------------------------------------------------------------
# Speech encoder modules.


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
    with _recording([self.w2v.feature_projection, *layers]) as states:
      encoded = self.w2v(input_features=features, attention_mask=mask.long()).last_hidden_state
    encoded = self.layer_norm(encoded)
    hidden = states[:-1] + [encoded]
    return hidden, self.pooler(encoded, mask)


@contextlib.contextmanager
def _recording(modules: Sequence[nn.Module]) -> Iterator[list]:
  """Collects each module's (first) output during the forward pass inside the block."""
  out: list = [None] * len(modules)

  def hook(i):
    def fn(module, args, output):
      del module, args
      out[i] = output[0] if isinstance(output, (tuple, list)) else output
    return fn

  handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
  try:
    yield out
  finally:
    for h in handles:
      h.remove()


@contextlib.contextmanager
def _recording_input(module: nn.Module) -> Iterator[list]:
  """Collects the hidden-state input of a module (e.g. the embedding output entering layer 0)."""
  out: list = [None]

  def fn(mod, args, kwargs):
    del mod
    out[0] = args[0] if args else kwargs["hidden_states"]

  handle = module.register_forward_pre_hook(fn, with_kwargs=True)
  try:
    yield out
  finally:
    handle.remove()


# ---------------------------------------------------------------------------------------------
# Tiny random configuration.


def tiny_text_config(vocab_size: int = TINY_VOCAB):
  from transformers import M2M100Config  # pylint: disable=import-outside-toplevel
  return M2M100Config(
      vocab_size=vocab_size, d_model=32, encoder_layers=3, encoder_attention_heads=4,
      encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
      max_position_embeddings=256, scale_embedding=True, activation_function="relu",
      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
      pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)


def tiny_speech_config():
  from transformers import Wav2Vec2BertConfig  # pylint: disable=import-outside-toplevel
  config = Wav2Vec2BertConfig(
      hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
      feature_projection_input_dim=160, position_embeddings_type="relative",
      conv_depthwise_kernel_size=7, max_source_positions=1024, hidden_act="swish",
      hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
      conformer_conv_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, add_adapter=False,
      use_intermediate_ffn_before_adapter=False)
  pooler = PoolerConfig(dim=32, layers=2, heads=4, ffn_dim=64, num_embeddings=32)
  return config, pooler


def _perturb_batch_norms(module: nn.Module, generator: torch.Generator) -> None:
  """Random running statistics so the tiny BatchNorms are not the identity."""
  for m in module.modules():
    if isinstance(m, nn.BatchNorm1d):
      m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
      m.running_var.copy_(1.0 + 0.2 * torch.rand(m.running_var.shape, generator=generator))


def build_tiny(seed: int = 0):
  """(tokenizer, text encoder, speech encoder): seeded, so every process builds the same model."""
  from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder  # pylint: disable=import-outside-toplevel
  tokenizer = tiny_nllb_tokenizer()
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(seed)
    text = M2M100Encoder(tiny_text_config())
    config, pooler = tiny_speech_config()
    speech = SonarSpeechEncoder(config, pooler)
    _perturb_batch_norms(speech, torch.Generator().manual_seed(seed + 1))
  return tokenizer, text, speech


# ---------------------------------------------------------------------------------------------
# The adapter.


class SonarAdapter(Adapter):
  """SONAR text encoder + (per-language) speech encoders behind the adapter interface.

  `speech_encoders` maps a canonical language code to a `SonarSpeechEncoder` or to a loader
  (callable returning one); '*' stands for every language (the tiny config has one shared
  speech encoder). Loaded encoders are cached one at a time, since each real one is ~600M
  parameters.
  """

  def __init__(self, *, name: str, tokenizer, text_encoder: nn.Module,
               speech_encoders: Mapping[str, object], device: str = "cpu",
               dtype: str = "float32", weights: dict | None = None):
    from transformers import SeamlessM4TFeatureExtractor  # pylint: disable=import-outside-toplevel
    self.name = name
    self.tokenizer = tokenizer
    self.device = seamless.resolve_device(device)
    self.dtype = torch_dtype(dtype)
    self.text_encoder = text_encoder.to(self.device, self.dtype).eval()
    self.speech_encoders = dict(speech_encoders)
    self.features = SeamlessM4TFeatureExtractor()
    self.weights = weights or {}
    self._speech: tuple[str, SonarSpeechEncoder] | None = None

  @functools.cached_property
  def _tokenizer_digest(self) -> str:
    return seamless.tokenizer_digest(self.tokenizer)

  # -- interface ------------------------------------------------------------------------------

  def sites(self) -> list[Site]:
    text_layers = len(self.text_encoder.layers) + 1
    return [Site(TEXT_SITE, "text", text_layers), Site(EMBEDDING_SITE, "text", 1),
            Site(SPEECH_SITE, "speech", self._speech_layer_count() + 1),
            Site(EMBEDDING_SITE, "speech", 1)]

  def supports_language(self, language: str, modality: str) -> bool:
    if modality == "text":
      try:
        code = nllb_code(language)
      except ValueError:
        return False
      return code in self.tokenizer.get_vocab()
    if modality == "speech":
      return "*" in self.speech_encoders or language in self.speech_encoders
    raise ValueError(f"unknown modality {modality!r}; choose 'text' or 'speech'")

  def run_text(self, texts: Sequence[str], language: str) -> dict[tuple[str, int], Capture]:
    code = nllb_code(language)
    if code not in self.tokenizer.get_vocab():
      raise ValueError(f"language {language!r} ({code}) is not in the SONAR tokenizer's vocabulary")
    self.tokenizer.src_lang = code
    batch = self.tokenizer(list(texts), padding=True, return_tensors="pt")
    ids = batch["input_ids"].to(self.device)
    mask = batch["attention_mask"].to(self.device).bool()
    enc = self.text_encoder
    with torch.inference_mode():
      with _recording_input(enc.layers[0]) as embedded, _recording(list(enc.layers)) as blocks:
        final = enc(input_ids=ids, attention_mask=mask.long()).last_hidden_state
      hidden = [embedded[0]] + blocks[:-1] + [final]
      counts = mask.sum(dim=1, keepdim=True).to(final.dtype)
      pooled = (final * mask.unsqueeze(-1)).sum(dim=1) / counts  # SONAR's masked mean pooling
    out = {(TEXT_SITE, l): Capture(h, mask) for l, h in enumerate(hidden)}
    out[(EMBEDDING_SITE, 0)] = _single(pooled)
    return out

  def run_speech(self, audios: Sequence[np.ndarray], sampling_rate: int,
                 language: str) -> dict[tuple[str, int], Capture]:
    if sampling_rate != SAMPLING_RATE:
      raise ValueError(f"SONAR takes {SAMPLING_RATE} Hz speech; got sampling_rate={sampling_rate}")
    short = [i for i, a in enumerate(audios) if len(a) < seamless.MIN_SAMPLES]
    if short:
      raise ValueError(f"speech items {short} of this batch are too short for one speech frame "
                       f"(at least {seamless.MIN_SAMPLES} samples)")
    encoder = self._speech_encoder(language)
    batch = self.features([np.asarray(a, dtype=np.float32) for a in audios],
                          sampling_rate=SAMPLING_RATE, padding=True, return_tensors="pt",
                          return_attention_mask=True)
    features = batch["input_features"].to(self.device, self.dtype)
    mask = batch["attention_mask"].to(self.device).bool()
    with torch.inference_mode():
      hidden, embedding = encoder(features, mask)
    out = {(SPEECH_SITE, l): Capture(h, mask) for l, h in enumerate(hidden)}
    out[(EMBEDDING_SITE, 0)] = _single(embedding)
    return out

  def describe(self) -> dict:
    return {
        "name": self.name, "family": "sonar", "dtype": str(self.dtype).replace("torch.", ""),
        "device": str(self.device), "weights": self.weights,
        "tokenizer": {"class": type(self.tokenizer).__name__, "size": len(self.tokenizer),
                      "digest": self._tokenizer_digest},
        "speech_languages": sorted(self.speech_encoders),
        "text_pooling": "masked mean over all non-pad tokens ([lang] tokens </s>)",
        "speech_pooling": "attention pooler (BOS query, post-norm decoder, bias-free linear)",
        "layer_convention": "0 = embeddings/frontend, 1..L-1 = blocks, L = final normed output",
        "sites": [dataclasses.asdict(s) for s in self.sites()],
    }

  # -- speech encoders ------------------------------------------------------------------------

  def _speech_encoder(self, language: str) -> SonarSpeechEncoder:
    key = language if language in self.speech_encoders else "*"
    if key not in self.speech_encoders:
      raise ValueError(f"no SONAR speech encoder for language {language!r}; have "
                       f"{sorted(self.speech_encoders)}")
    if self._speech is not None and self._speech[0] == key:
      return self._speech[1]
    self._speech = None  # release the previous encoder before loading the next one
    entry = self.speech_encoders[key]
    encoder = entry if isinstance(entry, nn.Module) else entry()
    encoder = encoder.to(self.device, self.dtype).eval()
    self._speech = (key, encoder)
    return encoder

  def _speech_layer_count(self) -> int:
    if self._speech is not None:
      return self._speech[1].num_layers
    entry = next(iter(self.speech_encoders.values()), None)
    return getattr(entry, "num_layers", 0)


def _single(vectors: torch.Tensor) -> Capture:
  """[B, D] -> a T=1 capture with an all-True mask."""
  b = vectors.shape[0]
  return Capture(vectors.unsqueeze(1), torch.ones(b, 1, dtype=torch.bool, device=vectors.device))


# ---------------------------------------------------------------------------------------------
# Loading.


def _speech_checkpoints(spec) -> dict[str, object]:
  """{language: loader} from a mapping {language: path} or a directory of '<lang>.pt' files."""
  from engine.models import convert_sonar  # pylint: disable=import-outside-toplevel
  if spec is None:
    return {}
  if isinstance(spec, (str, os.PathLike)):
    paths = sorted(glob.glob(os.path.join(os.fspath(spec), "*.pt")))
    if not paths:
      raise ValueError(f"no SONAR speech checkpoints (*.pt) in directory {os.fspath(spec)!r}")
    spec = {}
    for p in paths:
      stem = os.path.splitext(os.path.basename(p))[0]
      spec[stem.rsplit("_", 1)[-1]] = p  # 'sonar_speech_encoder_deu.pt' or 'deu.pt' -> 'deu'
  loaders = {}
  for language, path in spec.items():
    if isinstance(path, nn.Module):
      loaders[language] = path
    else:
      loaders[language] = _SpeechLoader(os.fspath(path), convert_sonar)
  return loaders


class _SpeechLoader:
  """Deferred conversion of one fairseq2 speech checkpoint (so unused languages cost nothing)."""

  num_layers = 24  # every released SONAR speech encoder is a 24-layer w2v-BERT 600M

  def __init__(self, path: str, converter):
    self.path, self.converter = path, converter

  def __call__(self) -> SonarSpeechEncoder:
    return self.converter.load_speech_encoder(self.path)


def load(model: str, device: str = "cpu", dtype: str = "float32", *, speech_encoders=None,
         tokenizer: str | None = None, seed: int = 0, text_heads: int = 16) -> SonarAdapter:
  """'sonar-tiny' (random, offline), or real weights.

  Real text weights: `model` is a hub id or local directory of the transformers port of the
  text encoder (an `M2M100Encoder` checkpoint, e.g. 'cointegrated/SONAR_200_text_encoder'), or
  a fairseq2 checkpoint file (*.pt) converted on the fly (`tokenizer` then names an NLLB
  tokenizer, default 'facebook/nllb-200-distilled-600M'). Speech: `speech_encoders` is
  {language: fairseq2 checkpoint path} or a directory of '<...>_<lang>.pt' files; if omitted
  and `model` is a directory with a 'speech' subdirectory, that is used.
  """
  if model.lower().endswith("sonar-tiny"):
    tok, text, speech = build_tiny(seed)
    return SonarAdapter(name=model, tokenizer=tok, text_encoder=text,
                        speech_encoders={"*": speech}, device=device, dtype=dtype,
                        weights={"text": f"random seed={seed}", "speech": f"random seed={seed}"})
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder  # pylint: disable=import-outside-toplevel
  from engine.models import convert_sonar  # pylint: disable=import-outside-toplevel
  if model.endswith(".pt"):
    text = convert_sonar.load_text_encoder(model, num_heads=text_heads)
    tok = AutoTokenizer.from_pretrained(tokenizer or "facebook/nllb-200-distilled-600M")
  else:
    text = M2M100Encoder.from_pretrained(model, dtype=torch_dtype(dtype))
    tok = AutoTokenizer.from_pretrained(tokenizer or model)
  if speech_encoders is None and os.path.isdir(os.path.join(model, "speech")):
    speech_encoders = os.path.join(model, "speech")
  speech = _speech_checkpoints(speech_encoders)
  return SonarAdapter(name=model, tokenizer=tok, text_encoder=text, speech_encoders=speech,
                      device=device, dtype=dtype,
                      weights={"text": model, "speech": {k: getattr(v, "path", "module")
                                                          for k, v in speech.items()}})
