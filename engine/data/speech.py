"""Offline speech for the bundled corpus: espeak-ng (from the `espeakng-loader` wheel) at 16 kHz.

libespeak-ng keeps wave-generator state across utterances inside a process (the same sentence
comes out a few samples longer or shorter depending on what was spoken before, and
espeak_Terminate does not reset it), so every utterance is synthesised in a fresh, minimal
Python subprocess that loads the bundled library through ctypes: the same text and voice then
give byte-identical audio. Results are cached on disk as 16 kHz mono float32 `.npy` files:

  {cache root}/speech/espeak-ng-{version}-16000hz/{voice}/{sha256(text)[:32]}.npy

The cache root is the `cache_dir` argument, else $XMODAL_CACHE, else ~/.cache/xmodal-svcca.
Writes are atomic (temporary file + os.replace); an unwritable cache warns once and the audio
is kept in memory only.

A language whose espeak-ng voice is missing, or whose voice cannot read some letters of the
text (espeak-ng's Japanese voice reads kana but spells kanji out as "Chinese letter" in English),
gets no speech: callers report it instead of passing off another language's voice.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import math
import os
import struct
import subprocess
import sys
import tempfile
import unicodedata
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import scipy.signal

from engine.data import languages as languages_lib

SAMPLING_RATE = 16_000
CACHE_ENV = "XMODAL_CACHE"
DEFAULT_CACHE = Path("~/.cache/xmodal-svcca")

# Runs as `python -I -S -c _WORKER LIB DATA MODE [VOICE]`: only ctypes, so it starts in ~30 ms.
# MODE voices: "version" line, then "identifier<TAB>name" lines.
# MODE synth: stdin UTF-8 text -> stdout int32 sample rate, then int16 samples (native order).
# MODE phonemes: stdin lines -> one line of phonemes each (language switches show as "(xx)").
_WORKER = r"""
import ctypes, struct, sys
lib = ctypes.CDLL(sys.argv[1])
rate = lib.espeak_Initialize(2, 0, sys.argv[2].encode(), 0x8000)
if rate <= 0:
  sys.exit("espeak_Initialize failed")
mode = sys.argv[3]
out = sys.stdout.buffer
class Voice(ctypes.Structure):
  _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p),
              ("identifier", ctypes.c_char_p), ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte),
              ("variant", ctypes.c_ubyte), ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int),
              ("spare", ctypes.c_void_p)]
if mode == "voices":
  lib.espeak_Info.restype = ctypes.c_char_p
  out.write(lib.espeak_Info(None) + b"\n")
  lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(Voice))
  voices = lib.espeak_ListVoices(None)
  i = 0
  while voices[i]:
    out.write(voices[i].contents.identifier + b"\t" + voices[i].contents.name + b"\n")
    i += 1
  sys.exit(0)
if lib.espeak_SetVoiceByName(sys.argv[4].encode()) != 0:
  sys.exit("espeak-ng has no voice named " + sys.argv[4])
if mode == "synth":
  Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                              ctypes.c_void_p)
  def collect(wav, n, events):
    if n > 0:
      out.write(ctypes.string_at(wav, 2 * n))
    return 0
  callback = Callback(collect)
  lib.espeak_SetSynthCallback(callback)
  out.write(struct.pack("<i", rate))
  text = sys.stdin.buffer.read() + b"\0"
  if lib.espeak_Synth(ctypes.c_char_p(text), ctypes.c_size_t(len(text)), 0, 1, 0, 1, None, None):
    sys.exit("espeak_Synth failed")
  lib.espeak_Synchronize()
elif mode == "phonemes":
  lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
  for line in sys.stdin.buffer.read().decode("utf-8").split("\n"):
    pointer = ctypes.pointer(ctypes.c_char_p(line.encode("utf-8")))
    parts = []
    while pointer.contents.value:
      parts.append(lib.espeak_TextToPhonemes(pointer, 1, 0) or b"")
    out.write(b" ".join(parts).replace(b"\n", b" ") + b"\n")
out.flush()
"""


def _run_worker(mode: str, voice: str | None = None, stdin: bytes = b"") -> bytes:
  import espeakng_loader  # pylint: disable=g-import-not-at-top
  argv = [sys.executable, "-I", "-S", "-c", _WORKER, espeakng_loader.get_library_path(),
          espeakng_loader.get_data_path(), mode] + ([voice] if voice else [])
  done = subprocess.run(argv, input=stdin, capture_output=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"espeak-ng worker ({mode}, voice {voice!r}) failed: "
                       f"{done.stderr.decode('utf-8', 'replace').strip()}")
  return done.stdout


@functools.cache
def espeak_info() -> dict:
  """The bundled espeak-ng: {'version': '1.52.0', 'voices': {identifier: name}}."""
  lines = _run_worker("voices").decode("utf-8").splitlines()
  voices = dict(line.split("\t", 1) for line in lines[1:])
  return {"version": lines[0].strip(), "voices": voices}


def espeak_voice(language: str) -> str | None:
  """The espeak-ng voice for a language, or None if the table has none or the library lacks it."""
  voice = languages_lib.get_language(language).espeak
  if voice is None:
    return None
  names = {identifier.rsplit("/", 1)[-1].lower() for identifier in espeak_info()["voices"]}
  return voice if voice.lower() in names else None


def speech_support(languages: Iterable[str] | None = None) -> dict[str, str | None]:
  """{language: voice or None}; a None is a language espeak-ng cannot speak."""
  return {code: espeak_voice(code) for code in languages_lib.resolve_languages(languages)}


# Unicode character-name prefixes of each ISO 15924 script in the language table.
_SCRIPT_NAMES = {
    "Latn": ("LATIN",), "Cyrl": ("CYRILLIC",), "Hans": ("CJK",), "Hang": ("HANGUL", "CJK"),
    "Jpan": ("CJK", "HIRAGANA", "KATAKANA"), "Arab": ("ARABIC",), "Deva": ("DEVANAGARI",),
    "Beng": ("BENGALI",), "Thai": ("THAI",), "Grek": ("GREEK",), "Ethi": ("ETHIOPIC",),
    "Geor": ("GEORGIAN",), "Taml": ("TAMIL",),
}


def _in_script(char: str, script: str) -> bool:
  return unicodedata.category(char)[0] == "L" and unicodedata.name(char, "").startswith(
      _SCRIPT_NAMES.get(script, ("",)))


def unreadable_characters(texts: Sequence[str], language: str) -> list[str]:
  """Letters of the language's own script that its voice cannot read.

  A letter counts when espeak-ng switches language both to read it alone and in a text holding
  it (where it spells it out, e.g. kanji as "Chinese letter"). Letters of other scripts (a Latin
  brand name in Russian) and loanwords a dictionary sends to another language on purpose
  (French "week-end") are read as a person would, and do not count.
  """
  voice = espeak_voice(language)
  if voice is None:
    raise ValueError(f"espeak-ng has no voice for language {language!r}")
  script = languages_lib.get_language(language).script
  letters = sorted({c for text in texts for c in text if _in_script(c, script)})
  if not letters:
    return []
  lines = letters + [" ".join(text.split()) for text in texts]
  phonemes = _run_worker("phonemes", voice, "\n".join(lines).encode("utf-8"))
  switches = ["(" in p for p in phonemes.decode("utf-8").split("\n")]
  switching_texts = [t for t, s in zip(texts, switches[len(letters):]) if s]
  return [c for c, s in zip(letters, switches) if s and any(c in t for t in switching_texts)]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
  """Where caches live: the argument, else $XMODAL_CACHE, else ~/.cache/xmodal-svcca."""
  if cache_dir is None:
    cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE
  return Path(cache_dir).expanduser()


def _cache_path(root: Path, voice: str, text: str) -> Path:
  version = espeak_info()["version"]
  digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
  return root / "speech" / f"espeak-ng-{version}-{SAMPLING_RATE}hz" / voice / f"{digest}.npy"


def _synthesize_one(text: str, voice: str) -> np.ndarray:
  raw = _run_worker("synth", voice, text.encode("utf-8"))
  (rate,) = struct.unpack("<i", raw[:4])
  samples = np.frombuffer(raw[4:], dtype=np.int16).astype(np.float64) / 32768.0
  if samples.size == 0:
    raise ValueError(f"espeak-ng voice {voice!r} produced no audio for {text!r}")
  return resample(samples, rate, SAMPLING_RATE)


def resample(audio: np.ndarray, rate: int, target: int = SAMPLING_RATE) -> np.ndarray:
  """Polyphase resampling (deterministic, anti-aliased) to `target` Hz, as float32."""
  if rate == target:
    return np.asarray(audio, dtype=np.float32)
  g = math.gcd(int(rate), int(target))
  out = scipy.signal.resample_poly(np.asarray(audio, np.float64), target // g, rate // g)
  return out.astype(np.float32)


def _load_cached(path: Path) -> np.ndarray | None:
  try:
    audio = np.load(path, allow_pickle=False)
  except (FileNotFoundError, NotADirectoryError):
    return None
  except (OSError, ValueError) as e:
    warnings.warn(f"ignoring unreadable cached speech {path}: {e}")
    return None
  if audio.dtype != np.float32 or audio.ndim != 1:
    warnings.warn(f"ignoring cached speech {path} with dtype {audio.dtype} shape {audio.shape}")
    return None
  return audio


def _save_atomic(path: Path, audio: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, audio, allow_pickle=False)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def synthesize(texts: Sequence[str], language: str, *,
               cache_dir: str | os.PathLike | None = None, cache: bool = True,
               check_characters: bool = True, workers: int | None = None) -> list[np.ndarray]:
  """Speech for each text: 16 kHz mono float32, deterministic, cached on disk.

  Raises ValueError naming the language when espeak-ng has no voice for it, or (with
  `check_characters`) when the voice cannot read letters of the texts.
  """
  language = languages_lib.resolve_language(language)
  voice = espeak_voice(language)
  if voice is None:
    raise ValueError(f"espeak-ng has no voice for language {language!r}; no speech is synthesised "
                     "rather than reading it with another language's voice")
  if check_characters:
    bad = unreadable_characters(texts, language)
    if bad:
      raise ValueError(f"espeak-ng voice {voice!r} cannot read {len(bad)} letters of the "
                       f"{language!r} text (e.g. {''.join(bad[:10])}); it would spell them out "
                       "in another language")
  root = cache_root(cache_dir)
  paths = [_cache_path(root, voice, text) for text in texts]
  audios: list[np.ndarray | None] = [
      _load_cached(path) if cache else None for path in paths]
  missing = [i for i, audio in enumerate(audios) if audio is None]
  if not missing:
    return audios  # type: ignore[return-value]
  workers = workers or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    fresh = list(pool.map(lambda i: _synthesize_one(texts[i], voice), missing))
  writable = cache
  for i, audio in zip(missing, fresh):
    audios[i] = audio
    if not writable:
      continue
    try:
      _save_atomic(paths[i], audio)
    except OSError as e:
      warnings.warn(f"speech cache {root} is not writable ({e}); synthesising in memory only "
                    f"(set {CACHE_ENV} or pass cache_dir= to choose another place)")
      writable = False
  return audios  # type: ignore[return-value]
