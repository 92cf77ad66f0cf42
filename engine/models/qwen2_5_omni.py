"""Qwen2.5-Omni's thinker (Xu et al. 2025): a Whisper-style encoder attending within 2 s chunks
over the clip's frames only (no padding), 2x average pooling, layer norm and a linear projection
into a Qwen2 LM with multimodal (3-D) rotary positions. The talker and vocoder are not loaded.

Audio enters as `<|audio_bos|><|AUDIO|><|audio_eos|>` in Qwen's ChatML template; the processor
expands <|AUDIO|> to one token per pooled encoder frame (25 per second).
"""
from __future__ import annotations

from torch import nn

from engine.models import audio_lm

NAMED = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
         "audio_eos_token": "<|audio_eos|>", "image_token": "<|IMAGE|>",
         "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
         "vision_eos_token": "<|vision_eos|>"}
SPECIALS = ("<|im_start|>", "<|im_end|>", *NAMED.values())
TINY_VOCAB = 4096
MEL_BINS = 128
# The chat template of Qwen/Qwen2.5-Omni-7B (audio, image, video and text items of a turn, in
# order; a default system turn when the conversation has none).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def audio_text_processor(tokenizer, feature_extractor, chat_template: str | None):
  """The real `Qwen2_5OmniProcessor` for audio and text. The class also requires image and
  video processors: the image processor is Qwen2-VL's PIL one and the video processor is left
  out (Qwen2-VL's needs torchvision, not a dependency); neither is used here."""
  from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessorPil  # pylint: disable=import-outside-toplevel

  class AudioTextProcessor(Qwen2_5OmniProcessor):
    """Qwen2_5OmniProcessor, constructible without a video processor."""
    def check_argument_for_proper_class(self, argument_name, argument):
      if argument_name == "video_processor" and argument is None:
        return None
      return super().check_argument_for_proper_class(argument_name, argument)

  return AudioTextProcessor(image_processor=Qwen2VLImageProcessorPil(), video_processor=None,
                            feature_extractor=feature_extractor, tokenizer=tokenizer,
                            chat_template=chat_template)


def tiny_processor():
  """Omni's processor over an offline Qwen2 tokenizer carrying Omni's named multimodal tokens
  and Omni's 128-bin Whisper feature extractor."""
  from transformers import WhisperFeatureExtractor  # pylint: disable=import-outside-toplevel
  tok = audio_lm.tiny_qwen2_tokenizer(SPECIALS, **NAMED)
  return audio_text_processor(tok, WhisperFeatureExtractor(feature_size=MEL_BINS), CHAT_TEMPLATE)


def processor_from_pretrained(model: str):
  """The checkpoint's processor; without torchvision (its video processor needs it), the same
  class over the checkpoint's tokenizer, feature extractor and chat template."""
  from transformers import AutoProcessor, AutoTokenizer, WhisperFeatureExtractor  # pylint: disable=import-outside-toplevel
  try:
    processor = AutoProcessor.from_pretrained(model)
    if hasattr(processor, "feature_extractor"):  # not a bare tokenizer
      return processor
  except (ImportError, OSError, TypeError, ValueError):
    pass
  tok = AutoTokenizer.from_pretrained(model)
  return audio_text_processor(tok, WhisperFeatureExtractor.from_pretrained(model),
                              getattr(tok, "chat_template", None) or CHAT_TEMPLATE)


def build_tiny(seed: int = 0):
  from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration  # pylint: disable=import-outside-toplevel
  processor = tiny_processor()
  tok = processor.tokenizer
  ids = {k: tok.convert_tokens_to_ids(v) for k, v in NAMED.items()}
  config = Qwen2_5OmniThinkerConfig(
      audio_config=dict(num_mel_bins=MEL_BINS, encoder_layers=2, encoder_attention_heads=4,
                        encoder_ffn_dim=64, d_model=32, output_dim=32, n_window=100,
                        max_source_positions=1500),
      vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                         out_hidden_size=32, fullatt_block_indexes=(0,)),
      text_config=dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                        "mrope_section": [1, 1, 2]}),
      audio_token_index=ids["audio_token"], image_token_index=ids["image_token"],
      video_token_index=ids["video_token"], audio_start_token_id=ids["audio_bos_token"],
      audio_end_token_id=ids["audio_eos_token"], vision_start_token_id=ids["vision_bos_token"],
      vision_end_token_id=ids["vision_eos_token"],
      user_token_id=tok.convert_tokens_to_ids(tok.tokenize("user"))[0])
  model = audio_lm.seeded(lambda: Qwen2_5OmniThinkerForConditionalGeneration(config), seed)
  return model, processor


def model_class():
  from transformers import Qwen2_5OmniThinkerForConditionalGeneration  # pylint: disable=import-outside-toplevel
  return Qwen2_5OmniThinkerForConditionalGeneration


def parts(model: nn.Module) -> audio_lm.Parts:
  inner = model.model
  return audio_lm.Parts(list(inner.audio_tower.layers), inner.audio_tower.proj,
                        list(inner.language_model.layers), inner.language_model.norm)


def layout(adapter, batch: dict, audios):
  """Packed rows: the encoder keeps each 2 s chunk's frames after its stride-2 conv; pooling
  and the projection run over a clip's frames together."""
  del audios
  window = 2 * adapter.model.config.audio_config.n_window  # mel frames per attention chunk
  frames, tokens = [], []
  for i, n in enumerate(int(x) for x in batch["feature_attention_mask"].sum(-1).tolist()):
    for start in range(0, n, window):
      kept = (min(window, n - start) - 1) // 2 + 1
      frames.append(audio_lm.Chunk(i, kept, kept))
    tokens += audio_lm.whisper_layout([n], [i])[1]
  return frames, tokens


FAMILY = audio_lm.family_card("qwen2.5-omni", ("qwen2.5-omni-tiny", "qwen2_5-omni-tiny"),
                              ("qwen2_5_omni_thinker", "qwen2_5_omni"))
RECIPE = audio_lm.Recipe(family=FAMILY, build_tiny=build_tiny, model_class=model_class,
                         parts=parts, body=lambda m: m.model, layout=layout,
                         processor_from_pretrained=processor_from_pretrained)


def load(model: str, **kwargs) -> audio_lm.AudioLMAdapter:
  """'qwen2.5-omni-tiny' (random, offline) or e.g. 'Qwen/Qwen2.5-Omni-7B' (its thinker)."""
  return audio_lm.load(RECIPE, model, **kwargs)
