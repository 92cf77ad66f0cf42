"""Length buckets: every item once, caps respected, little padding, deterministic."""
import datasets
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine.data import corpus
from engine.data.batching import audio_lengths, length_buckets, padding_fraction


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 500), max_size=80), max_batch=st.integers(1, 16),
       max_tokens=st.one_of(st.none(), st.integers(1, 2000)))
def test_buckets_cover_once_and_respect_caps(lengths, max_batch, max_tokens):
  batches = length_buckets(lengths, max_batch=max_batch, max_tokens=max_tokens)
  flat = np.concatenate(batches) if batches else np.zeros(0, np.int64)
  assert sorted(flat.tolist()) == list(range(len(lengths)))
  lengths = np.asarray(lengths, np.int64)
  for batch in batches:
    assert batch.dtype == np.int64 and 1 <= len(batch) <= max_batch
    assert (np.diff(lengths[batch]) <= 0).all()
    if max_tokens is not None and len(batch) > 1:
      assert len(batch) * lengths[batch].max() <= max_tokens
  assert [b.tolist() for b in length_buckets(lengths, max_batch=max_batch,
                                             max_tokens=max_tokens)] == [b.tolist() for b in batches]


def test_sorting_makes_padding_small():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 1000, size=512)
  bucketed = length_buckets(lengths, max_batch=16)
  arrival = [np.arange(i, min(i + 16, 512)) for i in range(0, 512, 16)]
  assert padding_fraction(lengths, bucketed) < 0.1 < padding_fraction(lengths, arrival)


def test_token_cap_and_oversized_item():
  batches = length_buckets([5, 1, 9, 3, 3, 7, 0, 50], max_batch=10, max_tokens=10)
  assert [b.tolist() for b in batches] == [[7], [2], [5], [0, 3], [4, 1, 6]]


@pytest.mark.parametrize("bad,match", [
    (dict(lengths=[1.5], max_batch=2), "integers"), (dict(lengths=[-1], max_batch=2), ">= 0"),
    (dict(lengths=[1], max_batch=0), "max_batch"),
    (dict(lengths=[1], max_batch=1, max_tokens=0), "max_tokens"),
])
def test_bad_arguments(bad, match):
  lengths = bad.pop("lengths")
  with pytest.raises(ValueError, match=match):
    length_buckets(lengths, **bad)


def test_audio_lengths_read_from_arrow():
  rows = [corpus.row(i, "eng", "x", None if i == 2 else np.zeros(i * 10, np.float32))
          for i in range(4)]
  ds = datasets.Dataset.from_list(rows, features=corpus.FEATURES)
  assert audio_lengths(ds).tolist() == [0, 10, 0, 30]
  assert audio_lengths(ds.select([3, 1])).tolist() == [30, 10]
