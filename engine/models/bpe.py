"""The offline byte-pair vocabulary every tiny model's tokenizer is built on.

Merges are learned on the bundled corpus over a fixed alphabet covering the scripts of the
default languages, so the tiny models of all families cut sentences the same way and need no
download. Each family wraps the result in its own tokenizer class and special tokens.
"""
from __future__ import annotations

import functools
import json

# Unicode blocks of the scripts of the 30 default languages (Latin with Vietnamese, Yoruba and
# Uzbek marks, Greek, Cyrillic, Arabic, Devanagari, Bengali, Tamil, Thai, Georgian, Ethiopic,
# kana, CJK ideographs, Hangul) plus punctuation and zero-width (non-)joiners. Every code point is taken, assigned or not,
# so the alphabet does not depend on the Python's Unicode version.
SCRIPT_BLOCKS = (
    (0x0021, 0x007E), (0x00A1, 0x024F), (0x02B0, 0x036F), (0x0370, 0x03FF), (0x0400, 0x052F),
    (0x0600, 0x06FF), (0x0750, 0x077F), (0x0900, 0x09FF), (0x0B80, 0x0BFF), (0x0E00, 0x0E7F),
    (0x10A0, 0x10FF), (0x1200, 0x139F), (0x1E00, 0x1EFF), (0x200B, 0x205E), (0x20A0, 0x20C0),
    (0x3001, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3))
TINY_MERGES = 2000
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")


def script_alphabet() -> list[str]:
  """Every code point of SCRIPT_BLOCKS except whitespace and control characters."""
  chars = []
  for lo, hi in SCRIPT_BLOCKS:
    for c in range(lo, hi + 1):
      ch = chr(c)
      if not ch.isspace() and not (c < 0x20 or 0x7F <= c < 0xA0):
        chars.append(ch)
  return chars


def bundled_sentences() -> list[str]:
  """The text of every language of the bundled corpus that is present (merges are learned here)."""
  from engine.data import bundled  # pylint: disable=import-outside-toplevel
  texts = []
  for code in bundled.bundled_languages():
    texts.extend(bundled.read_bundled_text(code).text.values())
  return texts


def normalizer():
  """Newlines and tabs to spaces, then NFKC (as NLLB's SentencePiece normaliser): full-width
  punctuation and compatibility forms map into the alphabet."""
  from tokenizers import Regex, normalizers  # pylint: disable=import-outside-toplevel
  return normalizers.Sequence([normalizers.Replace(Regex(r"[\n\r\t]"), " "), normalizers.NFKC()])


@functools.lru_cache(maxsize=4)
def bundled_bpe_json(merges: int = TINY_MERGES) -> str:
  """The trained `tokenizers` BPE as JSON (deterministic, a few tens of milliseconds)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  alphabet = script_alphabet()
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.normalizer = normalizer()
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                               split=True)
  trainer = trainers.BpeTrainer(
      vocab_size=len(SPECIAL_TOKENS) + 1 + len(alphabet) + merges, min_frequency=2,
      show_progress=False, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=["\u2581"] + alphabet)
  tok.train_from_iterator(bundled_sentences(), trainer=trainer)
  return tok.to_str()


def bundled_bpe(merges: int = TINY_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """(vocabulary {token: id}, merges) of the bundled-corpus BPE; SPECIAL_TOKENS take ids 0..3."""
  model = json.loads(bundled_bpe_json(merges))["model"]
  pairs = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
  return dict(model["vocab"]), pairs


def bundled_tokens(merges: int = TINY_MERGES) -> tuple[list[str], list[tuple[str, str]]]:
  """(tokens in id order, merges): for tokenizers that lay out their own special tokens first."""
  vocab, pairs = bundled_bpe(merges)
  return [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])], pairs
