"""Qwen2-Audio (Chu et al. 2024): a Whisper-style encoder (every clip padded to 30 s, attention
masked to the clip, 2x average pooling), a linear projector, a Qwen2 language model.

Audio enters as `Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>` in Qwen's chat template; the
processor expands <|AUDIO|> to one token per pooled encoder frame of the clip (25 per second).
"""
from __future__ import annotations

from engine.models import audio_lm

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
TINY_VOCAB = 4096  # embedding rows: fixed, >= the offline tokenizer, so weights never depend on it
MEL_BINS = 128


def tiny_processor():
  """The real `Qwen2AudioProcessor` (its own chat template) over an offline Qwen2 tokenizer and
  Qwen2-Audio's 128-bin Whisper feature extractor."""
  from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor  # pylint: disable=import-outside-toplevel
  tok = audio_lm.tiny_qwen2_tokenizer(SPECIALS)
  return Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=MEL_BINS),
                             tokenizer=tok)


def build_tiny(seed: int = 0):
  from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration  # pylint: disable=import-outside-toplevel
  processor = tiny_processor()
  config = Qwen2AudioConfig(
      audio_config=dict(num_mel_bins=MEL_BINS, d_model=32, encoder_layers=2,
                        encoder_attention_heads=4, encoder_ffn_dim=64, max_source_positions=1500,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
      text_config=audio_lm.tiny_qwen2_lm(TINY_VOCAB),
      audio_token_id=processor.audio_token_id)
  model = audio_lm.seeded(lambda: Qwen2AudioForConditionalGeneration(config), seed)
  return model, processor


def model_class():
  from transformers import Qwen2AudioForConditionalGeneration  # pylint: disable=import-outside-toplevel
  return Qwen2AudioForConditionalGeneration


def layout(adapter, batch: dict, audios):
  del adapter, audios
  return audio_lm.whisper_layout(batch["feature_attention_mask"].sum(-1).tolist())


FAMILY = audio_lm.family_card("qwen2-audio", ("qwen2-audio-tiny",), ("qwen2_audio",))
RECIPE = audio_lm.Recipe(family=FAMILY, build_tiny=build_tiny, model_class=model_class,
                         parts=audio_lm.projector_parts, body=lambda m: m.model, layout=layout)


def load(model: str, **kwargs) -> audio_lm.AudioLMAdapter:
  """'qwen2-audio-tiny' (random, offline) or e.g. 'Qwen/Qwen2-Audio-7B-Instruct'."""
  return audio_lm.load(RECIPE, model, **kwargs)
