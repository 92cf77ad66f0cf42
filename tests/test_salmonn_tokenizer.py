"""SALMONN's LLaMA tokenizer: the slow sentencepiece tokenizer with its added [PAD] token."""
import pickle

import pytest
import sentencepiece as spm

from engine.models import salmonn
from engine.models.bpe import bundled_sentences
from engine.models.salmonn_tokenizer import PAD_TOKEN, salmonn_tokenizer


def train_llama_spm(directory, vocab_size=400):
  """A LLaMA-shaped sentencepiece model (BPE, byte fallback, <unk>/<s>/</s> = 0/1/2) trained
  offline on the bundled English sentences; writes directory/tokenizer.model."""
  sentences = [s for s in bundled_sentences() if s.isascii()]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=str(directory / "tokenizer"),
      vocab_size=vocab_size, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
  return directory / "tokenizer.model"


@pytest.fixture(scope="module")
def vicuna(tmp_path_factory):
  directory = tmp_path_factory.mktemp("vicuna")
  return directory, spm.SentencePieceProcessor(model_file=str(train_llama_spm(directory)))


def test_prompt_template_ids_are_sentencepiece_ids(vicuna):
  directory, sp = vicuna
  tok = salmonn_tokenizer(str(directory))
  prompt = salmonn.PROMPT_TEMPLATE.format(salmonn.DEFAULT_INSTRUCTION)
  left, right = prompt.split(salmonn.SPEECH_SLOT)
  # SALMONN's prompt_wrap: each side tokenized alone, add_special_tokens=False (transformers
  # 4.28's slow LlamaTokenizer: sp_model.encode of the text, dummy prefix included).
  for piece in (left, right, "Ça va? 日本語", " two  spaces\tand a tab"):
    assert tok(piece, add_special_tokens=False)["input_ids"] == sp.encode(piece), piece
  assert tok.convert_ids_to_tokens(tok(left, add_special_tokens=False)["input_ids"]) == \
      sp.encode(left, out_type=str)
  assert tok("Hi")["input_ids"] == [1] + sp.encode("Hi")  # BOS, no EOS, as LlamaTokenizer
  again = pickle.loads(pickle.dumps(tok))  # adapters travel to worker processes
  assert again(left, add_special_tokens=False)["input_ids"] == sp.encode(left)


def test_pad_token_is_added_after_the_vocabulary(vicuna):
  directory, sp = vicuna
  tok = salmonn_tokenizer(str(directory))
  assert (tok.pad_token, tok.pad_token_id) == (PAD_TOKEN, sp.get_piece_size())
  assert len(tok) == sp.get_piece_size() + 1 and tok.padding_side == "right"
  assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
  # special tokens in text are split off whole, as the slow tokenizer's trie does
  assert tok("a </s> b", add_special_tokens=False)["input_ids"].count(2) == 1


def test_missing_tokenizer_model_is_named(tmp_path):
  with pytest.raises(ValueError, match="no tokenizer.model"):
    salmonn_tokenizer(str(tmp_path))
