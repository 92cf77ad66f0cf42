"""Activation store: incremental writes, completion and checksums, resume, metadata, locking."""
import json

import jax
import numpy as np
import pytest

from engine import store as store_lib
from engine.store import Key, Store, StoreError

META = {"model": {"name": "m", "dtype": "float32"}, "pooling": "mean", "languages": ["eng", "deu"],
        "ids": [3, 5, 8, 13, 21]}
KEY = Key("eng", "text", "text_encoder", 2)


def _values(n=5, d=4, seed=0):
  return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _write_all(st, key, values, batches=((0, 2), (1, 3), (4,))):
  writer = st.begin(key, values.shape[1])
  for rows in batches:
    rows = np.asarray(rows)
    writer.write(rows, values[rows])
  return writer


def test_write_complete_and_load(tmp_path):
  values = _values()
  with Store.open(tmp_path, META) as st:
    writer = _write_all(st, KEY, values)
    assert st.keys() == [] and KEY not in st  # not complete until finished
    assert st.finish([writer]) == [KEY]
    loaded = st.load(KEY)
  assert isinstance(loaded, np.memmap) and not loaded.flags.writeable
  assert loaded.dtype == np.float32 and loaded.shape == (5, 4)
  np.testing.assert_array_equal(loaded, values)
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  entry = manifest["representations"][KEY.name]
  assert entry["complete"] and entry["sha256"] == store_lib.file_sha256(tmp_path / entry["file"])
  assert manifest["metadata"]["ids"] == META["ids"] and manifest["metadata"]["dtype"] == "float32"
  assert not (tmp_path / f"{KEY.name}.done.npy").exists()
  reader = store_lib.open_store(tmp_path)
  assert reader.keys() == [KEY] and reader.ids == META["ids"] and reader.shape(KEY) == (5, 4)
  np.testing.assert_array_equal(reader.representations()[KEY], values)


def test_incomplete_representation_is_never_returned(tmp_path):
  values = _values()
  with Store.open(tmp_path, META) as st:
    writer = st.begin(KEY, 4)
    writer.write(np.array([0, 1]), values[:2])
    assert st.finish([writer]) == []  # rows 2..4 missing: stays incomplete
    writer.close()
  reader = store_lib.open_store(tmp_path)
  assert reader.keys() == [] and reader.keys(complete=False) == [KEY]
  with pytest.raises(StoreError, match="not complete"):
    reader.load(KEY)
  with pytest.raises(StoreError, match="no representation"):
    reader.load(Key("deu", "text", "text_encoder", 2))


def test_resume_keeps_written_rows(tmp_path):
  values = _values()
  with Store.open(tmp_path, META) as st:
    writer = st.begin(KEY, 4)
    writer.write(np.array([1, 3]), values[[1, 3]])
    st.sync()
    other = st.begin(KEY._replace(layer=3), 4)  # begun after the last sync: starts over
    other.write(np.array([0]), values[:1])
    writer.close()
    other.close()
  with Store.open(tmp_path, META) as st:
    assert st.keys(complete=False) == [KEY]
    np.testing.assert_array_equal(st.begin(KEY._replace(layer=3), 4).missing(), np.arange(5))
    writer = st.begin(KEY, 4)
    np.testing.assert_array_equal(writer.missing(), [0, 2, 4])
    assert not writer.pending(np.array([1, 3])) and writer.pending(np.array([0, 1]))
    writer.write(np.array([0, 2, 4]), values[[0, 2, 4]])
    assert st.finish([writer]) == [KEY]
    np.testing.assert_array_equal(st.load(KEY), values)
    with pytest.raises(StoreError, match="already complete"):
      st.begin(KEY, 4)


def test_crash_between_data_and_flags_recomputes_rows(tmp_path, monkeypatch):
  """A kill after the data rows are written but before their flags: the rows count as missing."""
  values = _values()
  with Store.open(tmp_path, META) as st:
    writer = st.begin(KEY, 4)
    writer.write(np.array([0, 1]), values[:2])
    st.sync()
    writer._data[np.array([2, 3])] = 99.0  # data of a batch whose flags never got written
    writer._data.flush()
    writer.close()
  with Store.open(tmp_path, META) as st:
    writer = st.begin(KEY, 4)
    np.testing.assert_array_equal(writer.missing(), [2, 3, 4])
    writer.write(np.array([2, 3, 4]), values[2:])
    st.finish([writer])
    np.testing.assert_array_equal(st.load(KEY), values)


def test_different_metadata_is_refused(tmp_path):
  Store.open(tmp_path, META).close()
  with pytest.raises(StoreError, match=r"pooling: \"mean\" \(store\) vs \"max\" \(this run\)"):
    Store.open(tmp_path, {**META, "pooling": "max"})
  with pytest.raises(StoreError, match=r"model\.dtype"):
    Store.open(tmp_path, {**META, "model": {"name": "m", "dtype": "bfloat16"}})
  with pytest.raises(StoreError, match="ids"):
    Store.open(tmp_path, {**META, "ids": [1, 2, 3, 4, 5]})
  Store.open(tmp_path, dict(META)).close()  # the same metadata (JSON round trip) is fine


def test_checksum_mismatch_is_detected(tmp_path):
  with Store.open(tmp_path, META) as st:
    st.finish([_write_all(st, KEY, _values())])
  path = tmp_path / f"{KEY.name}.npy"
  raw = bytearray(path.read_bytes())
  raw[-1] ^= 0xFF
  path.write_bytes(bytes(raw))
  reader = store_lib.open_store(tmp_path)
  with pytest.raises(StoreError, match="checksum"):
    reader.load(KEY)
  assert reader.verify() == [KEY]
  assert reader.load(KEY, verify=False).shape == (5, 4)


def test_one_writer_at_a_time_and_readers_follow_it(tmp_path):
  with Store.open(tmp_path, META) as st:
    with pytest.raises(StoreError, match="being written by pid"):
      Store.open(tmp_path, META)
    reader = store_lib.open_store(tmp_path)  # readers need no lock
    assert reader.keys() == []
    st.finish([_write_all(st, KEY, _values())])
    assert reader.keys() == [] and reader.refresh().keys() == [KEY]
  Store.open(tmp_path, META).close()  # released


def test_read_only_store_cannot_write(tmp_path):
  Store.open(tmp_path, META).close()
  reader = store_lib.open_store(tmp_path)
  with pytest.raises(StoreError, match="read-only"):
    reader.begin(KEY, 4)
  with pytest.raises(StoreError, match="no activation store"):
    store_lib.open_store(tmp_path / "absent")


def test_new_store_needs_ids_and_unique_ids(tmp_path):
  with pytest.raises(StoreError, match="ids"):
    Store.open(tmp_path / "a", {"pooling": "mean"})
  with pytest.raises(StoreError, match="repeat"):
    Store.open(tmp_path / "b", {"ids": [1, 1]})


def test_wrong_width_or_shape_is_refused(tmp_path):
  with Store.open(tmp_path, META) as st:
    writer = st.begin(KEY, 4)
    with pytest.raises(StoreError, match="shape"):
      writer.write(np.array([0]), np.zeros((1, 3), np.float32))
    writer.close()
    with pytest.raises(StoreError, match="width 4"):
      st.begin(KEY, 8)


def test_skipped_is_recorded(tmp_path):
  with Store.open(tmp_path, META) as st:
    st.mark_skipped("deu", "speech", "the corpus has no audio for this language")
  assert store_lib.open_store(tmp_path).skipped() == {
      "deu.speech": "the corpus has no audio for this language"}


def test_keys():
  assert Key.parse("eng.speech.post_adaptor.0") == Key("eng", "speech", "post_adaptor", 0)
  assert store_lib.as_key(("eng", "text", "text_encoder", np.int64(3))) == KEY._replace(layer=3)
  assert Key("eng", "text", "text_encoder", 2) == ("eng", "text", "text_encoder", 2)
  with pytest.raises(ValueError, match="language.modality.site.layer"):
    Key.parse("eng.text.3")
  with pytest.raises(ValueError, match="letters"):
    store_lib.as_key(("eng", "text", "bad.site", 0))


def test_to_jax_shares_cpu_memory(tmp_path):
  values = _values(64, 16)
  with Store.open(tmp_path, {**META, "ids": list(range(64))}) as st:
    st.finish([_write_all(st, KEY, values, batches=(np.arange(64),))])
    array = st.load_jax(KEY)
  assert isinstance(array, jax.Array) and array.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(array), values)
  mapped = np.load(tmp_path / f"{KEY.name}.npy", mmap_mode="c")
  shared = store_lib.to_jax(mapped)
  if jax.default_backend() == "cpu":
    assert shared.unsafe_buffer_pointer() == mapped.ctypes.data  # no copy
  readonly = np.load(tmp_path / f"{KEY.name}.npy", mmap_mode="r")
  np.testing.assert_array_equal(np.asarray(store_lib.to_jax(readonly)), values)  # falls back to a copy
