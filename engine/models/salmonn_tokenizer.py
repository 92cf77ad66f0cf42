"""The LLaMA tokenizer as SALMONN loads it: `LlamaTokenizer.from_pretrained(llm, use_fast=False)`
under transformers 4.28 (the sentencepiece tokenizer), then `add_special_tokens({'pad_token':
'[PAD]'})` and right padding. transformers 5's `AutoTokenizer` would build a different
implementation (the tokenizers-backed LlamaTokenizer) from the same files; SALMONN's weights
were trained on the sentencepiece one's ids, so real weights get that one."""
from __future__ import annotations

import os

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

PAD_TOKEN = "[PAD]"


class SlowLlamaTokenizer(SentencePieceBackend):
  """transformers 4.28's sentencepiece `LlamaTokenizer`, the one SALMONN loads (`use_fast=
  False`): pieces as sentencepiece encodes them (legacy: the dummy prefix kept), BOS prepended
  when special tokens are added. transformers 5 keeps only its generic sentencepiece backend."""

  def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
    bos = [self.bos_token_id]
    return bos + token_ids_0 if token_ids_1 is None else bos + token_ids_0 + bos + token_ids_1


def salmonn_tokenizer(llm: str) -> SlowLlamaTokenizer:
  """The LLaMA tokenizer as SALMONN builds it: the slow sentencepiece tokenizer from the LLM's
  tokenizer.model, plus its added pad token '[PAD]' (id = vocabulary size), right padding."""
  path = os.path.join(llm, "tokenizer.model")
  if not os.path.isdir(llm):
    from huggingface_hub import hf_hub_download  # pylint: disable=import-outside-toplevel
    path = hf_hub_download(llm, "tokenizer.model")
  if not os.path.exists(path):
    raise ValueError(f"LLM {llm!r} has no tokenizer.model; SALMONN tokenizes with the slow "
                     "sentencepiece LlamaTokenizer, which needs it")
  tokenizer = SlowLlamaTokenizer(vocab_file=path, legacy=True, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
  tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
  tokenizer.padding_side = "right"
  return tokenizer
