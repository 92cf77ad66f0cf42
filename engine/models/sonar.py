"""SONAR's text and speech encoders seen as sites of activations.

SONAR (Duquenne et al. 2023) trains a text encoder and per-language speech encoders into one
fixed-size sentence space. Both encoders are rebuilt here from transformers/torch components:

* text: `M2M100Encoder` (NLLB-style pre-norm transformer, input `[lang] tokens </s>`), then
  masked mean pooling over every non-pad token of the final layer-normed output;
* speech: `SonarSpeechEncoder` (engine.models.sonar_modules): a w2v-BERT conformer over
  160-dim stacked fbanks with SONAR's convolutions, a closing LayerNorm and an attention pooler.

Sites (key = (site, layer)):
* ('text_encoder', l), l = 0..L: l=0 is the embedding output (scaled tokens + positions),
  l=1..L-1 the block outputs, l=L the final layer-normed output (what SONAR pools); this is
  transformers' `output_hidden_states` convention.
* ('speech_encoder', l), l = 0..L: l=0 is the feature projection output, l=1..L-1 conformer
  block outputs, l=L the output of the closing LayerNorm (what the pooler attends to).
* ('sentence_embedding', 0) for both modalities: SONAR's sentence vector, T=1, mask all True.
Text masks cover every non-pad token including the language token and </s>, as SONAR pools
them, so mean pooling of ('text_encoder', L) equals the text sentence embedding; with
`pool_special_tokens=False` they cover the sentence's own tokens only (the sentence embedding
stays SONAR's own, over every token).

Models: 'sonar-tiny' is a seeded random config of the same classes with an offline
`NllbTokenizer` (NLLB special tokens and language codes over the bundled-corpus BPE of
engine.models.bpe) and one speech encoder shared by every language; real
weights are the transformers port of the text encoder (`from_pretrained`) or fairseq2
checkpoints converted by engine.models.convert_sonar, one speech encoder per language.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from engine.models import bpe, common
from engine.models.base import Capture, Family, Site
from engine.models.common import TorchAdapter, recording, single, stacked_fbanks
from engine.models.sonar_modules import PoolerConfig, SonarSpeechEncoder

TEXT_SITE = "text_encoder"
SPEECH_SITE = "speech_encoder"
EMBEDDING_SITE = "sentence_embedding"
FAMILY = Family(
    name="sonar", random=r"sonar-tiny$",
    site_map={"text": (TEXT_SITE, EMBEDDING_SITE), "speech": (SPEECH_SITE, EMBEDDING_SITE)})
# The languages of SONAR's released speech encoders (its model card sonar_speech_encoder.yaml).
SPEECH_LANGUAGES = (
    "arb", "asm", "bel", "ben", "bos", "bul", "cat", "ces", "cmn", "cym", "dan", "deu", "eng",
    "est", "fin", "fra", "guj", "heb", "hin", "hrv", "ind", "ita", "jpn", "kan", "kor", "lao",
    "lit", "lvs", "mal", "mar", "mkd", "mlt", "nld", "npi", "ory", "pan", "pes", "pol", "por",
    "ron", "rus", "slk", "slv", "snd", "spa", "srp", "swh", "tam", "tel", "tgl", "tha", "tur",
    "ukr", "urd", "uzn", "vie", "yue")
# Speech checkpoint file names ending in a language code: as released ('spenc.eng.pt',
# 'spenc.v3ap.deu.pt', 'spenc.v5ap.cmn.pt'), as fairseq2's card names them
# ('sonar_speech_encoder_deu.pt') or bare ('deu.pt').
_CHECKPOINT_NAME = re.compile(r"^(?:.*[._])?([a-z]{3})\.pt$")
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


# ---------------------------------------------------------------------------------------------
# Offline tokenizer for the tiny config.


def tiny_nllb_tokenizer():
  """A real `NllbTokenizer` built offline: NLLB's special tokens (<s>=0, <pad>=1, </s>=2,
  <unk>=3) and language codes (eng_Latn, ...) over the bundled-corpus BPE."""
  from transformers import NllbTokenizer  # pylint: disable=import-outside-toplevel
  tokens, merges = bpe.bundled_tokens()
  vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  tokenizer = NllbTokenizer(vocab=vocab, merges=merges)
  tokenizer.backend_tokenizer.normalizer = bpe.normalizer()  # as the BPE was trained
  if len(tokenizer) > TINY_VOCAB:
    raise ValueError(f"offline NLLB tokenizer has {len(tokenizer)} tokens, more than TINY_VOCAB")
  return tokenizer


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


class SonarAdapter(TorchAdapter):
  """SONAR text encoder + (per-language) speech encoders behind the adapter interface.

  `speech_encoders` maps a canonical language code to a `SonarSpeechEncoder` or to a loader
  (callable returning one); '*' stands for every language (the tiny config has one shared
  speech encoder). Loaded encoders are cached one at a time, since each real one is ~600M
  parameters.
  """

  family = FAMILY

  def __init__(self, *, name: str, tokenizer, text_encoder: nn.Module,
               speech_encoders: Mapping[str, object], device: str = "cpu",
               dtype: str = "float32", weights: dict | None = None,
               pool_special_tokens: bool = True):
    from transformers import SeamlessM4TFeatureExtractor  # pylint: disable=import-outside-toplevel
    super().__init__(name=name, tokenizer=tokenizer, device=device, dtype=dtype,
                     weights=weights or {})
    self.text_encoder = self.place(text_encoder)
    self.speech_encoders = dict(speech_encoders)
    self.pool_special_tokens = pool_special_tokens
    self.features = SeamlessM4TFeatureExtractor()
    self._speech: tuple[str, SonarSpeechEncoder] | None = None

  # -- interface ------------------------------------------------------------------------------

  def sites(self) -> list[Site]:
    text_layers = len(self.text_encoder.layers) + 1
    sites = [Site(TEXT_SITE, "text", text_layers), Site(EMBEDDING_SITE, "text", 1)]
    if not self.speech_encoders:
      return sites  # text weights only: no speech site to report
    return sites + [Site(SPEECH_SITE, "speech", self._speech_layer_count() + 1),
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
    batch = self.tokenizer(list(texts), padding=True, return_tensors="pt",
                           return_special_tokens_mask=True)
    ids = batch["input_ids"].to(self.device)
    mask = batch["attention_mask"].to(self.device).bool()
    sentence = common.text_mask(batch, self.pool_special_tokens).to(self.device)
    enc = self.text_encoder
    with torch.inference_mode():
      with recording(list(enc.layers), entering=enc.layers[0]) as states:
        final = enc(input_ids=ids, attention_mask=mask.long()).last_hidden_state
      hidden = states[:-1] + [final]
      counts = mask.sum(dim=1, keepdim=True).to(final.dtype)
      pooled = (final * mask.unsqueeze(-1)).sum(dim=1) / counts  # SONAR's masked mean pooling
    out = {(TEXT_SITE, l): Capture(h, sentence) for l, h in enumerate(hidden)}
    out[(EMBEDDING_SITE, 0)] = single(pooled)
    return out

  def run_speech(self, audios: Sequence[np.ndarray], sampling_rate: int,
                 language: str) -> dict[tuple[str, int], Capture]:
    features, mask = stacked_fbanks(self.features, audios, sampling_rate, model="SONAR",
                                    device=self.device, dtype=self.dtype)
    encoder = self._speech_encoder(language)
    with torch.inference_mode():
      hidden, embedding = encoder(features, mask)
    out = {(SPEECH_SITE, l): Capture(h, mask) for l, h in enumerate(hidden)}
    out[(EMBEDDING_SITE, 0)] = single(embedding)
    return out

  def describe(self) -> dict:
    return {
        **super().describe(),
        "speech_languages": sorted(self.speech_encoders),
        "text_pooling": "masked mean over all non-pad tokens ([lang] tokens </s>)",
        "pool_special_tokens": self.pool_special_tokens,
        "text_mask": ("every non-pad token: [lang] tokens </s>" if self.pool_special_tokens
                      else "the sentence's tokens (not [lang], </s>)"),
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
    encoder = self.place(encoder)
    self._speech = (key, encoder)
    return encoder

  def _speech_layer_count(self) -> int:
    if self._speech is not None:
      return self._speech[1].num_layers
    entry = next(iter(self.speech_encoders.values()), None)
    return getattr(entry, "num_layers", 0)


# ---------------------------------------------------------------------------------------------
# Loading.


def checkpoint_language(path: str | os.PathLike) -> str:
  """The canonical language of a SONAR speech checkpoint, from its file name."""
  from engine.data import languages  # pylint: disable=import-outside-toplevel
  name = os.path.basename(os.fspath(path))
  m = _CHECKPOINT_NAME.match(name.lower())
  code = m.group(1) if m else None
  if code is not None:
    try:
      return languages.resolve_language(code)
    except ValueError:
      if code in SPEECH_LANGUAGES:
        return code
  raise ValueError(f"cannot tell the language of SONAR speech checkpoint {name!r}: name it as "
                   "released (spenc.v3ap.deu.pt, spenc.eng.pt) or <lang>.pt, or pass "
                   "speech_encoders={language: path}")


def _speech_checkpoints(spec) -> dict[str, object]:
  """{language: loader} from a mapping {language: path} or a directory of checkpoints named
  by language (see `checkpoint_language`)."""
  from engine.models import convert_sonar  # pylint: disable=import-outside-toplevel
  if spec is None:
    return {}
  if isinstance(spec, (str, os.PathLike)):
    paths = sorted(glob.glob(os.path.join(os.fspath(spec), "*.pt")))
    if not paths:
      raise ValueError(f"no SONAR speech checkpoints (*.pt) in directory {os.fspath(spec)!r}")
    spec = {}
    for p in paths:
      language = checkpoint_language(p)
      if language in spec:
        raise ValueError(f"two SONAR speech checkpoints for language {language!r}: "
                         f"{os.path.basename(spec[language])!r} and {os.path.basename(p)!r}; "
                         "keep one")
      spec[language] = p
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
         tokenizer: str | None = None, seed: int = 0, text_heads: int = 16,
         pool_special_tokens: bool = True) -> SonarAdapter:
  """'sonar-tiny' (random, offline), or real weights.

  Real text weights: `model` is a hub id or local directory of the transformers port of the
  text encoder (an `M2M100Encoder` checkpoint, e.g. 'cointegrated/SONAR_200_text_encoder'), or
  a fairseq2 checkpoint file (*.pt) converted on the fly (`tokenizer` then names an NLLB
  tokenizer, default 'facebook/nllb-200-distilled-600M'). Speech: `speech_encoders` is
  {language: fairseq2 checkpoint path} or a directory of checkpoints named by language as
  released ('spenc.v3ap.deu.pt', 'spenc.eng.pt') or '<lang>.pt'; if omitted and `model` is a
  directory with a 'speech' subdirectory, that is used. Without speech encoders the adapter
  has text sites only. pool_special_tokens: whether the text encoder's masks keep [lang] and
  </s> (the default, as SONAR pools) or the sentence's own tokens only.
  """
  if FAMILY.random_match(model):
    tok, text, speech = build_tiny(seed)
    return SonarAdapter(name=model, tokenizer=tok, text_encoder=text,
                        speech_encoders={"*": speech}, device=device, dtype=dtype,
                        weights={"text": f"random seed={seed}", "speech": f"random seed={seed}"},
                        pool_special_tokens=pool_special_tokens)
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder  # pylint: disable=import-outside-toplevel
  from engine.models import convert_sonar  # pylint: disable=import-outside-toplevel
  if model.endswith(".pt"):
    text = convert_sonar.load_text_encoder(model, num_heads=text_heads)
    tok = AutoTokenizer.from_pretrained(tokenizer or "facebook/nllb-200-distilled-600M")
  else:
    text = M2M100Encoder.from_pretrained(model, dtype=common.torch_dtype(dtype))
    tok = AutoTokenizer.from_pretrained(tokenizer or model)
  if speech_encoders is None and os.path.isdir(os.path.join(model, "speech")):
    speech_encoders = os.path.join(model, "speech")
  speech = _speech_checkpoints(speech_encoders)
  return SonarAdapter(name=model, tokenizer=tok, text_encoder=text, speech_encoders=speech,
                      device=device, dtype=dtype, pool_special_tokens=pool_special_tokens,
                      weights={"text": model, "speech": {k: getattr(v, "path", "module")
                                                          for k, v in speech.items()}})
