"""The activation store under damage and faults: truncated or bit-flipped arrays and manifests,
rows damaged while a representation is incomplete, unwritable or read-only places, a full
disk. Each ends in a StoreError naming the file and the way out, never in a wrong number, and
leaves what was already complete readable."""
import contextlib
import errno
import json
import os
import subprocess
import uuid
import zlib

import numpy as np
import pytest

from engine import store as store_lib
from engine.store import Key, Store, StoreError, open_store

META = {"model": {"name": "m"}, "pooling": "mean", "languages": ["eng", "deu"],
        "ids": list(range(10, 22))}
N, D = len(META["ids"]), 6
KEYS = [Key("eng", "text", "text_encoder", 0), Key("eng", "text", "text_encoder", 1),
        Key("deu", "speech", "speech_encoder", 2)]


def values(key: Key) -> np.ndarray:
  seed = zlib.crc32(key.name.encode())
  return np.random.default_rng(seed).standard_normal((N, D)).astype(np.float32)


def write(st: Store, key: Key, rows=None) -> store_lib.Writer:
  writer = st.begin(key, D)
  rows = np.arange(N) if rows is None else np.asarray(rows)
  for part in np.array_split(rows, 3):
    if part.size:
      writer.write(part, values(key)[part])
  return writer


@pytest.fixture
def complete(tmp_path):
  """A store holding every key of KEYS, complete."""
  with Store.open(tmp_path, META) as st:
    st.finish([write(st, k) for k in KEYS])
  return tmp_path


def assert_intact(path, keys=KEYS):
  st = open_store(path)
  assert not set(st.verify()) & set(keys)
  for key in keys:
    np.testing.assert_array_equal(st.load(key), values(key))


# ----------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("cut", [0, 60, 128, -1])
def test_truncated_array_names_file_and_recovery(complete, cut):
  path = complete / f"{KEYS[1].name}.npy"
  size = path.stat().st_size
  with open(path, "r+b") as f:
    f.truncate(cut % size)
  st = open_store(complete)
  with pytest.raises(StoreError, match=rf"{KEYS[1].name}\.npy does not match its checksum .*"
                                       r"delete .* and run the extraction again"):
    st.load(KEYS[1])
  with pytest.raises(StoreError, match=rf"cannot read .*{KEYS[1].name}\.npy.*delete"):
    st.load(KEYS[1], verify=False)
  assert st.verify() == [KEYS[1]]
  assert_intact(complete, [KEYS[0], KEYS[2]])


def test_every_bit_flip_in_an_array_is_caught(complete):
  path = complete / f"{KEYS[0].name}.npy"
  raw = path.read_bytes()
  rng = np.random.default_rng(0)
  for offset in list(range(0, len(raw), 7)) + [len(raw) - 1]:
    flipped = bytearray(raw)
    flipped[offset] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(flipped))
    with pytest.raises(StoreError, match="checksum|cannot read"):
      open_store(complete).load(KEYS[0])
  path.write_bytes(raw)
  assert_intact(complete)


def test_deleting_a_damaged_array_recomputes_only_it(complete):
  """The recovery the messages give: delete the file, run again."""
  (complete / f"{KEYS[2].name}.npy").unlink()
  with pytest.raises(StoreError, match=r"is missing; run the extraction again"):
    open_store(complete).load(KEYS[2])
  with Store.open(complete, META) as st:
    assert st.keys() == sorted(KEYS[:2])  # forgotten, so extraction runs it again
    st.finish([write(st, KEYS[2])])
  assert_intact(complete)


# ----------------------------------------------------------------------------- manifest


def test_truncated_manifest(complete):
  manifest = complete / "manifest.json"
  manifest.write_bytes(manifest.read_bytes()[:len(manifest.read_bytes()) // 2])
  for opener in (open_store, lambda p: Store.open(p, META)):
    with pytest.raises(StoreError, match=r"manifest\.json is corrupt or truncated.*delete .* "
                                         r"and extract again"):
      opener(complete)


def test_every_bit_flip_in_the_manifest_is_refused(complete):
  manifest = complete / "manifest.json"
  raw = manifest.read_bytes()
  rng = np.random.default_rng(1)
  for offset in range(len(raw)):
    flipped = bytearray(raw)
    flipped[offset] ^= 1 << int(rng.integers(8))
    manifest.write_bytes(bytes(flipped))
    with pytest.raises(StoreError, match=r"manifest\.json"):
      open_store(complete)
  manifest.write_bytes(raw)
  assert_intact(complete)


def test_manifest_edited_consistently_is_still_refused(complete):
  """A flip that keeps valid JSON (a sentence id, a language) is caught by the checksum."""
  manifest = complete / "manifest.json"
  doc = json.loads(manifest.read_text())
  doc["metadata"]["ids"][3] += 1
  manifest.write_text(json.dumps(doc, indent=1))
  with pytest.raises(StoreError, match="does not match its own checksum.*delete"):
    open_store(complete)
  del doc["checksum"]  # stores written before manifests carried a checksum still open
  doc["metadata"]["ids"][3] -= 1
  manifest.write_text(json.dumps(doc, indent=1))
  assert_intact(complete)


def test_leftovers_of_a_killed_run_are_cleared(complete):
  """Killed while writing the manifest (a temporary), or after completing a representation but
  before removing its tags: the next writer clears both."""
  stale = complete / ".manifest.json.12345.tmp"
  stale.write_text('{"half": ')
  tags = complete / f"{KEYS[0].name}.done.npy"
  np.save(tags, np.ones(N, np.uint64))
  assert_intact(complete)  # readers never look at them
  Store.open(complete, META).close()
  assert not stale.exists() and not tags.exists()
  assert_intact(complete)


# ----------------------------------------------------------------- incomplete representations


def test_damaged_rows_of_an_incomplete_representation_are_recomputed(tmp_path):
  key = KEYS[0]
  with Store.open(tmp_path, META) as st:
    writer = write(st, key, rows=range(8))
    st.sync()
    writer.close()
  data = np.load(tmp_path / f"{key.name}.npy", mmap_mode="r+")
  data[2, 1] = np.float32(1e30)  # a damaged row ...
  data.flush()
  tags = np.load(tmp_path / f"{key.name}.done.npy", mmap_mode="r+")
  tags[9] = 1  # ... and a flipped tag claiming an unwritten row
  tags.flush()
  del data, tags
  with Store.open(tmp_path, META) as st:
    writer = st.begin(key, D)
    np.testing.assert_array_equal(writer.missing(), [2, 8, 9, 10, 11])
    writer.write(writer.missing(), values(key)[writer.missing()])
    assert st.finish([writer]) == [key]
  assert_intact(tmp_path, [key])


def test_truncated_leftovers_start_the_representation_over(tmp_path):
  key = KEYS[1]
  with Store.open(tmp_path, META) as st:
    write(st, key, rows=range(5)).close()
    st.sync()
  for suffix in (".npy", ".done.npy"):
    path = tmp_path / f"{key.name}{suffix}"
    path.write_bytes(path.read_bytes()[:40])
  with Store.open(tmp_path, META) as st:
    writer = st.begin(key, D)
    np.testing.assert_array_equal(writer.missing(), np.arange(N))
    writer.write(np.arange(N), values(key))
    st.finish([writer])
  assert_intact(tmp_path, [key])


# ----------------------------------------------------------------- unwritable places


def test_output_under_a_file_is_refused_clearly(tmp_path):
  blocker = tmp_path / "results"
  blocker.write_text("a file, not a directory")
  with pytest.raises(StoreError, match=r"cannot write activation store .*results/store.*"
                                       r"choose a writable output directory"):
    Store.open(blocker / "store", META)


@contextlib.contextmanager
def tmpfs(path, size: str):
  """A small tmpfs at path (root only; skips where mounting is not allowed)."""
  path.mkdir(parents=True, exist_ok=True)
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  name = f"xmodal-{uuid.uuid4().hex[:8]}"
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", name, str(path)],
                        capture_output=True, text=True, check=False)
  if done.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path):
  subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def test_read_only_output_dir(tmp_path):
  if os.geteuid() != 0:
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o555)
    ctx = contextlib.nullcontext(target)
  else:
    ctx = tmpfs(tmp_path / "ro", "1m")
  with ctx as target:
    if os.geteuid() == 0:
      remount_read_only(target)
    with pytest.raises(StoreError, match=r"cannot write activation store .*: (Read-only file "
                                         r"system|Permission denied).*writable output directory"):
      Store.open(target / "store", META)
    if os.geteuid() != 0:
      target.chmod(0o755)


def test_read_only_store_still_reads(complete):
  """A finished store copied to read-only media reads (and verifies) without writing."""
  if os.geteuid() == 0:
    pytest.skip("root ignores file modes")
  for p in list(complete.iterdir()) + [complete]:
    p.chmod(0o555 if p.is_dir() else 0o444)
  try:
    assert_intact(complete)
    with pytest.raises(StoreError, match="cannot write activation store"):
      Store.open(complete, META)
  finally:
    for p in [complete] + list(complete.iterdir()):
      p.chmod(0o755 if p.is_dir() else 0o644)


# ----------------------------------------------------------------- a full disk


def _enospc(*_, **__):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_when_allocating(tmp_path, monkeypatch):
  with Store.open(tmp_path, META) as st:
    st.finish([write(st, KEYS[0])])
    monkeypatch.setattr(store_lib.os, "posix_fallocate", _enospc)
    with pytest.raises(StoreError, match=rf"cannot allocate .*{KEYS[1].name}\.npy .*no space left"
                                         r".*Free disk space.*resumes"):
      st.begin(KEYS[1], D)
    assert not list(tmp_path.glob(f"{KEYS[1].name}*"))  # nothing half-made is left
    monkeypatch.undo()
    st.finish([write(st, KEYS[1])])
  assert_intact(tmp_path, KEYS[:2])


def test_disk_full_when_writing_the_manifest(tmp_path, monkeypatch):
  with Store.open(tmp_path, META) as st:
    st.finish([write(st, KEYS[0])])
    writer = write(st, KEYS[1])
    st.sync()
    before = (tmp_path / "manifest.json").read_bytes()
    monkeypatch.setattr(store_lib.os, "fsync", _enospc)
    with pytest.raises(StoreError, match=r"cannot write .*manifest\.json: no space left.*left as "
                                         r"it was"):
      st.finish([writer])
    monkeypatch.undo()
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert not list(tmp_path.glob(".manifest.json.*"))
  assert_intact(tmp_path, KEYS[:1])
  assert KEYS[1] not in open_store(tmp_path)
  with Store.open(tmp_path, META) as st:  # the rows were kept: resuming only finishes it
    writer = st.begin(KEYS[1], D)
    assert writer.full
    st.finish([writer])
  assert_intact(tmp_path, KEYS[:2])


def test_disk_full_when_flushing_rows(tmp_path, monkeypatch):
  with Store.open(tmp_path, META) as st:
    writer = st.begin(KEYS[0], D)
    writer.write(np.arange(4), values(KEYS[0])[:4])
    st.sync()
    monkeypatch.setattr(np.memmap, "flush", _enospc)
    with pytest.raises(StoreError, match=rf"cannot write rows of .*{KEYS[0].name}\.npy: no space"):
      writer.write(np.arange(4, 8), values(KEYS[0])[4:8])
    monkeypatch.undo()
    writer.close()
  with Store.open(tmp_path, META) as st:
    writer = st.begin(KEYS[0], D)
    assert set(writer.missing()) >= set(range(4, N))  # unflagged rows are recomputed
    writer.write(writer.missing(), values(KEYS[0])[writer.missing()])
    st.finish([writer])
  assert_intact(tmp_path, KEYS[:1])


def test_a_really_full_disk(tmp_path):
  """A 1 MiB tmpfs: representations fill it until allocation fails with a clear error, what
  completed before stays valid, and with space freed the run finishes."""
  meta = {**META, "ids": list(range(2000))}
  with tmpfs(tmp_path / "small", "1m") as root:
    rng = np.random.default_rng(0)
    done = []
    with Store.open(root / "store", meta) as st:
      with pytest.raises(StoreError, match=r"(cannot allocate|cannot write).*no space left"):
        for layer in range(100):
          key = Key("eng", "text", "text_encoder", layer)
          writer = st.begin(key, 32)
          writer.write(np.arange(2000), rng.standard_normal((2000, 32)).astype(np.float32))
          st.finish([writer])
          done.append(key)
    assert 0 < len(done) < 100
    reader = open_store(root / "store")
    assert reader.keys() == sorted(done) and reader.verify() == []
    (root / "store" / f"{done[0].name}.npy").unlink()  # free space by dropping one
    with Store.open(root / "store", meta) as st:
      assert done[0] not in st.keys()
      writer = st.begin(done[0], 32)
      writer.write(np.arange(2000), np.ones((2000, 32), np.float32))
      st.finish([writer])
    assert open_store(root / "store").verify() == []
