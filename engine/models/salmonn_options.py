"""How sentences enter SALMONN and which positions count as the sentence: plain data, no torch,
so the sweep's settings (engine.settings) offer the same choices the adapter takes."""
from __future__ import annotations

import dataclasses

PROMPT_TEMPLATE = "USER: <Speech><SpeechHere></Speech> {}\nASSISTANT:"
SPEECH_SLOT = "<SpeechHere>"
DEFAULT_INSTRUCTION = "Recognize the speech and give me the transcription."
MASK_SCOPES = ("sentence", "all")
TEXT_PROMPTS = ("template", "plain")


@dataclasses.dataclass(frozen=True)
class SalmonnOptions:
  """How sentences enter the model and which positions count as the sentence."""
  window_seconds: float = 0.333333
  stride_seconds: float = 0.333333
  prompt_template: str = PROMPT_TEMPLATE
  instruction: str = DEFAULT_INSTRUCTION
  mask_scope: str = "sentence"
  text_prompt: str = "template"

  def __post_init__(self):
    if self.mask_scope not in MASK_SCOPES:
      raise ValueError(f"unknown mask_scope {self.mask_scope!r}; choose one of {MASK_SCOPES}")
    if self.text_prompt not in TEXT_PROMPTS:
      raise ValueError(f"unknown text_prompt {self.text_prompt!r}; choose one of {TEXT_PROMPTS}")
    if self.prompt_template.count(SPEECH_SLOT) != 1:
      raise ValueError(f"prompt_template {self.prompt_template!r} must contain {SPEECH_SLOT} once")
