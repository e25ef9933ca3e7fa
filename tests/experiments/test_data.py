"""Corpus loading, the fixed train/validation split and step-addressed batches."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import data


def test_split_is_deterministic_disjoint_and_complete():
  ids = np.arange(1_000_003, dtype=np.int64)  # every "token" unique and odd length
  train, val = data.split_train_val(ids, val_fraction=0.05, split_block=4096)
  train2, val2 = data.split_train_val(ids.copy(), val_fraction=0.05, split_block=4096)
  np.testing.assert_array_equal(train, train2)
  np.testing.assert_array_equal(val, val2)
  assert np.intersect1d(train, val).size == 0
  assert train.size + val.size == ids.size
  assert 0.04 < val.size / ids.size < 0.06
  # Validation blocks are spread over the whole corpus, not only its end.
  assert val.min() < ids.size // 10 and val.max() > ids.size * 9 // 10


def test_small_corpus_still_gets_both_splits():
  train, val = data.split_train_val(np.arange(100), val_fraction=0.1, split_block=65536)
  assert train.size and val.size and np.intersect1d(train, val).size == 0


def test_load_file_and_directory(tmp_path):
  (tmp_path / "b.txt").write_text("second file\n")
  (tmp_path / "a.txt").write_text("first file\n" * 50)
  (tmp_path / ".hidden").write_text("skipped")
  corpus, desc = data.load_corpus(tmp_path)
  assert corpus.index(b"first file") < corpus.index(b"second file")
  assert b"skipped" not in corpus and "2 files" in desc
  single, _ = data.load_corpus(tmp_path / "b.txt")
  assert single == b"second file\n"
  ds = data.load_dataset(tmp_path, val_fraction=0.2, split_block=64)
  assert ds.vocab_size == 256 and ds.train.dtype == np.uint8
  assert ds.fingerprint == data.load_dataset(tmp_path, val_fraction=0.2, split_block=64).fingerprint


def test_stdlib_corpus_is_sorted_python_source():
  files = data.stdlib_files()
  assert len(files) > 100 and all(f.suffix == ".py" for f in files)
  assert not any("site-packages" in f.parts for f in files)
  corpus, desc = data.load_corpus(None)
  assert corpus.startswith(b"# file: ") and "stdlib" in desc
  assert len(corpus) > 5_000_000


def test_train_batches_are_a_pure_function_of_the_step(tmp_path):
  (tmp_path / "c.txt").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 50_000,
                                                                           dtype=np.uint8)))
  ds = data.load_dataset(tmp_path / "c.txt", split_block=1024)
  a = data.train_batch(ds, 7, batch_size=4, seq_len=33, seed=1)
  b = data.train_batch(ds, 7, batch_size=4, seq_len=33, seed=1)
  c = data.train_batch(ds, 8, batch_size=4, seq_len=33, seed=1)
  d = data.train_batch(ds, 7, batch_size=4, seq_len=33, seed=2)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert not np.array_equal(a["inputs"], c["inputs"]) and not np.array_equal(a["inputs"], d["inputs"])
  assert a["inputs"].shape == (4, 33) and a["inputs"].dtype == np.int32
  np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
  vb = data.val_batches(ds, num_batches=3, batch_size=2, seq_len=16)
  assert len(vb) == 3 and vb[0]["targets"].shape == (2, 16)
  np.testing.assert_array_equal(vb[1]["inputs"], data.val_batches(ds, num_batches=3, batch_size=2,
                                                                  seq_len=16)[1]["inputs"])


def test_errors(tmp_path):
  with pytest.raises(data.DataError, match="does not exist"):
    data.load_corpus(tmp_path / "missing.txt")
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(data.DataError, match="is empty"):
    data.load_corpus(tmp_path / "empty.txt")
  (tmp_path / "emptydir").mkdir()
  with pytest.raises(data.DataError, match="is empty"):
    data.load_corpus(tmp_path / "emptydir")
  (tmp_path / "one.txt").write_text("x")
  with pytest.raises(data.DataError, match="too few to split"):
    data.load_dataset(tmp_path / "one.txt")
  (tmp_path / "short.txt").write_text("abcdefghij" * 10)
  ds = data.load_dataset(tmp_path / "short.txt", val_fraction=0.5)
  with pytest.raises(data.DataError, match="fewer than seq_len"):
    ds.check_seq_len(64)
  with pytest.raises(ValueError, match="val_fraction"):
    data.split_train_val(np.arange(10), val_fraction=1.5)
