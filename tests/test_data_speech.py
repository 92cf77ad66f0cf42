"""espeak-ng speech: 16 kHz, deterministic, cached atomically, honest about missing voices."""
import os
import warnings

import numpy as np
import pytest

from engine.data import speech

SENTENCES = ["The sun is shining today.", "I drink a cup of tea every morning."]


def test_audio_format():
  (audio,) = speech.synthesize(SENTENCES[:1], "eng", cache=False)
  assert audio.dtype == np.float32 and audio.ndim == 1
  assert 0.5 < len(audio) / speech.SAMPLING_RATE < 5
  assert np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0.05


def test_deterministic_whatever_was_spoken_before():
  first = speech.synthesize(SENTENCES, "eng", cache=False)
  again = speech.synthesize(SENTENCES[::-1] + ["Guten Morgen."], "eng", cache=False)
  assert first[0].tobytes() == again[1].tobytes()
  assert first[1].tobytes() == again[0].tobytes()


def test_cache_layout_reuse_and_atomicity(tmp_path, monkeypatch):
  fresh = speech.synthesize(SENTENCES, "deu", cache_dir=tmp_path)
  version = speech.espeak_info()["version"]
  files = sorted((tmp_path / "speech" / f"espeak-ng-{version}-16000hz" / "de").iterdir())
  assert len(files) == 2 and all(f.suffix == ".npy" for f in files)
  assert not list(tmp_path.rglob("*.tmp"))

  def no_synthesis(*args):
    raise AssertionError(f"synthesised despite the cache: {args}")

  monkeypatch.setattr(speech, "_synthesize_one", no_synthesis)
  cached = speech.synthesize(SENTENCES, "de_de", cache_dir=tmp_path)
  assert all(a.tobytes() == b.tobytes() for a, b in zip(fresh, cached))


def test_corrupt_cache_entry_is_resynthesised(tmp_path):
  (fresh,) = speech.synthesize(SENTENCES[:1], "eng", cache_dir=tmp_path)
  (path,) = tmp_path.rglob("*.npy")
  path.write_bytes(b"not numpy")
  with pytest.warns(UserWarning, match="unreadable cached speech"):
    (again,) = speech.synthesize(SENTENCES[:1], "eng", cache_dir=tmp_path)
  assert again.tobytes() == fresh.tobytes()
  assert np.load(path).tobytes() == fresh.tobytes()


def test_cache_root_argument_env_default(tmp_path, monkeypatch):
  monkeypatch.setenv(speech.CACHE_ENV, str(tmp_path / "env"))
  assert speech.cache_root() == tmp_path / "env"
  assert speech.cache_root(tmp_path / "arg") == tmp_path / "arg"
  monkeypatch.delenv(speech.CACHE_ENV)
  assert speech.cache_root() == speech.DEFAULT_CACHE.expanduser()
  monkeypatch.setenv(speech.CACHE_ENV, str(tmp_path / "env"))
  speech.synthesize(SENTENCES[:1], "eng")
  assert list((tmp_path / "env" / "speech").rglob("*.npy"))


def test_unwritable_cache_warns_and_synthesises_in_memory(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.warns(UserWarning, match="not writable"):
    (audio,) = speech.synthesize(SENTENCES[:1], "eng", cache_dir=blocker / "cache")
  assert audio.size > 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_cache_dir(tmp_path):
  tmp_path.chmod(0o555)
  try:
    with pytest.warns(UserWarning, match="not writable"):
      (audio,) = speech.synthesize(SENTENCES[:1], "eng", cache_dir=tmp_path)
    assert audio.size > 0
  finally:
    tmp_path.chmod(0o755)


@pytest.mark.parametrize("language", ["yor", "zu_za", "mon"])
def test_missing_voice_is_an_error_naming_the_language(language):
  with pytest.raises(ValueError, match="no voice for language"):
    speech.synthesize(["Hello."], language, cache=False)


def test_unreadable_letters_are_detected_not_spoken():
  assert speech.unreadable_characters(["今日は天気がいいです。"], "jpn") == ["今", "天", "日", "気"]
  assert speech.unreadable_characters(["きょうはてんきがいいです。"], "jpn") == []
  assert speech.unreadable_characters(["Я купил iPhone."], "rus") == []  # foreign script: fine
  with pytest.raises(ValueError, match="cannot read"):
    speech.synthesize(["今日は天気がいいです。"], "jpn", cache=False)


def test_resample_keeps_duration_and_tone():
  t = np.arange(22050) / 22050
  tone = np.sin(2 * np.pi * 440 * t)
  out = speech.resample(tone, 22050)
  assert out.dtype == np.float32 and len(out) == 16000
  spectrum = np.abs(np.fft.rfft(out))
  assert abs(np.argmax(spectrum) - 440) <= 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert speech.resample(out, 16000) is not None
