"""Writing one representation: rows into a preallocated memory-mapped array, then their tags.

Apart from `engine.store` (which hands writers out from `Store.begin` and completes them in
`Store.finish`) because the crash-safety of a single array is its own concern: data flushed
before the tag that claims it, tags that are crc32s so damaged rows are found on resume, and
blocks reserved on disk up front so a full disk is an error, not SIGBUS.
"""
from __future__ import annotations

import errno
import os
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.lib.format import open_memmap

from engine.keys import Key
from engine.store_files import DTYPE, RECOVER_WRITE, Entry, StoreError, reason

TAG = np.dtype(np.uint64)  # per-row tags in .done.npy


class _Directory(Protocol):
  """What a writer needs of its store (an engine.store.Store): the directory, for errors."""
  path: Path


def row_tags(values: np.ndarray) -> np.ndarray:
  """[rows] uint64 tags of float32 rows: crc32 of each row's bytes, shifted, low bit set."""
  values = np.ascontiguousarray(values, dtype=DTYPE)
  crcs = [zlib.crc32(row.tobytes()) for row in values]
  return (np.asarray(crcs, dtype=TAG) << np.uint64(1)) | np.uint64(1)


class Writer:
  """Streams rows of one representation into its preallocated array (see engine.store)."""

  def __init__(self, store: _Directory, entry: Entry, data: np.memmap, done: np.memmap):
    self.store, self.entry, self._data, self._done = store, entry, data, done

  @property
  def key(self) -> Key:
    return self.entry.key

  @property
  def dim(self) -> int:
    return self.entry.shape[1]

  def pending(self, rows: np.ndarray) -> bool:
    """Whether any of these rows still has to be written."""
    return not bool((self._done[np.asarray(rows)] != 0).all())

  def missing(self) -> np.ndarray:
    """Indices of rows not written yet."""
    return np.flatnonzero(np.asarray(self._done) == 0)

  @property
  def full(self) -> bool:
    return bool((np.asarray(self._done) != 0).all())

  def write(self, rows: np.ndarray, values: np.ndarray) -> None:
    """Writes values [len(rows), d] at rows: data first and flushed, then the rows' tags."""
    rows = np.asarray(rows, dtype=np.int64)
    values = np.ascontiguousarray(values, dtype=DTYPE)
    if values.shape != (rows.size, self.dim):
      raise StoreError(f"{self.key.name}: got values of shape {values.shape} for {rows.size} rows "
                       f"of width {self.dim}")
    try:
      self._data[rows] = values
      self._data.flush()
      self._done[rows] = row_tags(values)
      self._done.flush()
    except OSError as e:
      raise StoreError(f"cannot write rows of {self.store.path / self.entry.file}: {reason(e)}. "
                       f"{RECOVER_WRITE}") from e

  def check_rows(self) -> np.ndarray:
    """Un-tags written rows whose bytes no longer match their crc32; returns those rows."""
    written = np.flatnonzero(np.asarray(self._done) != 0)
    if not written.size:
      return written
    bad = written[row_tags(self._data[written]) != self._done[written]]
    if bad.size:
      self._done[bad] = 0
      self._done.flush()
    return bad

  def close(self) -> None:
    for arr in (self._data, self._done):
      if arr is not None:
        arr.flush()
    self._data = self._done = None


def allocate(path: Path, dtype: np.dtype, shape: tuple) -> np.memmap:
  """A zero-filled .npy of this shape, memory-mapped, with its blocks reserved on disk where
  the file system allows: a full disk fails here (OSError), not later as SIGBUS in a write."""
  array = open_memmap(path, mode="w+", dtype=dtype, shape=shape)
  if hasattr(os, "posix_fallocate"):
    with open(path, "r+b") as f:
      try:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
      except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
          del array
          raise
  return array
