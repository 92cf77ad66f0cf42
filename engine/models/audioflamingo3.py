"""Audio Flamingo 3 (Goel et al. 2025): a Whisper-large-style encoder over 30 s windows
(attention masked to the clip, 2x average pooling), a two-layer MLP projector, a Qwen2 LM.

Audio enters as `<sound>` at the start of the user turn of Qwen's ChatML template; the processor
cuts a clip into 30 s windows and expands <sound> to one token per pooled encoder frame.
"""
from __future__ import annotations


from engine.models import audio_lm

SPECIALS = ("<|im_start|>", "<|im_end|>", "<sound>")
TINY_VOCAB = 4096
MEL_BINS = 128
WINDOW_SAMPLES = 30 * audio_lm.SAMPLING_RATE
# The chat template of nvidia/audio-flamingo-3-hf: ChatML, a default system turn, audio items
# rendered as <sound> ahead of the turn's text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'audio' %}<sound>{% endif %}"
    "{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_processor():
  from transformers import AudioFlamingo3Processor, WhisperFeatureExtractor  # pylint: disable=import-outside-toplevel
  tok = audio_lm.tiny_qwen2_tokenizer(SPECIALS)
  return AudioFlamingo3Processor(feature_extractor=WhisperFeatureExtractor(feature_size=MEL_BINS),
                                 tokenizer=tok, chat_template=CHAT_TEMPLATE)


def build_tiny(seed: int = 0):
  from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration  # pylint: disable=import-outside-toplevel
  processor = tiny_processor()
  config = AudioFlamingo3Config(
      audio_config=dict(model_type="audioflamingo3_encoder", num_mel_bins=MEL_BINS,
                        hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_source_positions=1500),
      text_config=audio_lm.tiny_qwen2_lm(TINY_VOCAB),
      audio_token_id=processor.audio_token_id)
  model = audio_lm.seeded(lambda: AudioFlamingo3ForConditionalGeneration(config), seed)
  return model, processor


def model_class():
  from transformers import AudioFlamingo3ForConditionalGeneration  # pylint: disable=import-outside-toplevel
  return AudioFlamingo3ForConditionalGeneration


def layout(adapter, batch: dict, audios):
  """30 s windows per clip (as the processor cuts them), each a Whisper-style chunk."""
  processor = adapter.processor
  windows = int(processor.max_audio_len // processor.feature_extractor.chunk_length)
  owners = []
  for i, a in enumerate(audios):
    owners += [i] * min(windows, max(1, -(-len(a) // WINDOW_SAMPLES)))
  return audio_lm.whisper_layout(batch["input_features_mask"].sum(-1).tolist(), owners)


FAMILY = audio_lm.family_card("audioflamingo3", ("audioflamingo3-tiny",), ("audioflamingo3",))
RECIPE = audio_lm.Recipe(family=FAMILY, build_tiny=build_tiny, model_class=model_class,
                         parts=audio_lm.projector_parts, body=lambda m: m.model, layout=layout)


def load(model: str, **kwargs) -> audio_lm.AudioLMAdapter:
  """'audioflamingo3-tiny' (random, offline) or e.g. 'nvidia/audio-flamingo-3-hf'."""
  return audio_lm.load(RECIPE, model, **kwargs)
