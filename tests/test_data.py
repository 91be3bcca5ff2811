"""grain pipelines: determinism, per-process split, packing, exact resume."""
import collections
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from bitnet_jax.data.batch import Batch
from bitnet_jax import defaults
from bitnet_jax.data import pipeline as data

SEQ = 31  # rows of 32 tokens
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_cfg(**kw):
  d = defaults.base_config().data
  d.update(dict(batch_size=4, prefetch=0))
  d.update(kw)
  return d


def take(it, n):
  return [next(it) for _ in range(n)]


def same(a, b):
  def fields(batch):
    return {k: v for k, v in vars(batch).items() if v is not None}
  return len(a) == len(b) and all(
      set(fields(x)) == set(fields(y)) and all(
          np.array_equal(fields(x)[k], fields(y)[k]) for k in fields(x))
      for x, y in zip(a, b))


def doc_tokens(tok, doc):
  return [tok.bos_id, *tok.encode(doc), tok.eos_id]


def test_seeded_order(documents, small_tokenizer):
  def batches(seed):
    ds = data.train_dataset(documents, small_tokenizer, data_cfg(), seq_len=SEQ,
                            seed=seed)
    return take(iter(ds), 5)
  first = batches(0)
  assert isinstance(first[0], Batch) and not first[0].packed
  assert first[0].tokens.shape == (4, SEQ + 1)
  assert first[0].tokens.dtype == np.int32
  assert same(first, batches(0))
  assert not same(first, batches(1))


def epoch_rows(docs, tok, packing, index=0, count=1, seed=0):
  rows = data.packed_rows(docs, tok, row_len=SEQ + 1, packing=packing, seed=seed,
                          shuffle=True, repeat=False, process_index=index,
                          process_count=count, num_bins=4)
  return list(rows)


def real_tokens(rows):
  return [t for r in rows for t, s in zip(r["tokens"], r["segment_ids"]) if s > 0]


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_two_processes_are_disjoint_and_cover_the_corpus(documents,
                                                         small_tokenizer,
                                                         packing):
  tok = small_tokenizer
  docs = documents[:60]
  per_process = [epoch_rows(docs, tok, packing, i, 2) for i in range(2)]
  for i, rows in enumerate(per_process):
    mine = collections.Counter(t for d in docs[i::2] for t in doc_tokens(tok, d))
    assert collections.Counter(real_tokens(rows)) == mine
  everything = collections.Counter(t for d in docs for t in doc_tokens(tok, d))
  both = collections.Counter(real_tokens(per_process[0]) +
                             real_tokens(per_process[1]))
  assert both == everything  # no token lost or duplicated


def test_concat_rows_are_the_shuffled_document_stream(documents,
                                                      small_tokenizer):
  tok = small_tokenizer
  docs = documents[:40]
  rows = epoch_rows(docs, tok, "concat", seed=3)
  stream = real_tokens(rows)
  assert all(len(r["tokens"]) == SEQ + 1 for r in rows)
  assert all((r["segment_ids"] > 0).all() for r in rows[:-1])  # only the tail pads
  # The stream is the documents, whole and in some order: rebuild it greedily.
  remaining = {i: doc_tokens(tok, d) for i, d in enumerate(docs)}
  pos = 0
  while pos < len(stream):
    match = [i for i, t in remaining.items() if stream[pos:pos + len(t)] == t]
    assert match, f"no document starts at stream position {pos}"
    pos += len(remaining.pop(match[0]))
  assert not remaining


def test_first_fit_segments_and_positions(documents, small_tokenizer):
  tok = small_tokenizer
  docs = documents[:40]
  rows = epoch_rows(docs, tok, "first_fit")
  pieces = []
  for r in rows:
    seg, pos, toks = r["segment_ids"], r["positions"], r["tokens"]
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      assert (np.diff(idx) == 1).all(), "a segment is contiguous"
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      pieces.append(list(toks[idx]))
  # Every piece is a consecutive slice of a document, cut at row length.
  expected = collections.Counter()
  for d in docs:
    t = doc_tokens(tok, d)
    for i in range(0, len(t), SEQ + 1):
      expected[tuple(t[i:i + SEQ + 1])] += 1
  assert collections.Counter(tuple(p) for p in pieces) == expected


@pytest.mark.parametrize("packing,prefetch,rows,k", [
    ("concat", 0, 0, 9), ("concat", 2, 1024, 9), ("first_fit", 2, 1024, 9),
    # A row-shuffle window that starts where the packer has no remainder: the
    # JSON state then holds grain's (-1, -1) sentinel as a list.
    ("concat", 0, 8, 3), ("concat", 2, 8, 5)])
def test_restore_is_exact(documents, small_tokenizer, packing, prefetch, rows, k):
  cfg = data_cfg(packing=packing, prefetch=prefetch, shuffle_rows=rows,
                 batch_size=2)
  make = lambda: iter(data.train_dataset(documents, small_tokenizer, cfg,
                                         seq_len=SEQ, seed=7))
  it = make()
  take(it, k)
  state = json.loads(json.dumps(it.get_state()))  # survives serialisation
  expected = take(it, 6)
  fresh = make()
  fresh.set_state(state)
  assert same(take(fresh, 6), expected)


SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np
    from bitnet_jax import defaults
    from bitnet_jax.data import pipeline as data
    from bitnet_jax.data import tokenizer
    mode, corpus_file, tok_file, state_file, out_file = sys.argv[1:]
    docs = json.load(open(corpus_file))
    tok = tokenizer.Tokenizer.load(tok_file)
    cfg = defaults.base_config().data
    cfg.batch_size, cfg.prefetch, cfg.worker_count = 4, 2, 0
    it = iter(data.train_dataset(docs, tok, cfg, seq_len=31, seed=5))
    if mode == "first":
      for _ in range(7): next(it)
      open(state_file, "w").write(json.dumps(it.get_state()))
    else:
      it.set_state(json.loads(open(state_file).read()))
    np.save(out_file, np.stack([next(it).tokens for _ in range(4)]))
""")


@pytest.mark.slow
def test_restore_across_process_restart(tmp_path, documents, small_tokenizer):
  (tmp_path / "run.py").write_text(SCRIPT)
  (tmp_path / "docs.json").write_text(json.dumps(documents))
  small_tokenizer.save(tmp_path / "tok.model")
  args = [str(tmp_path / n) for n in ("docs.json", "tok.model", "state.json")]
  for mode in ("first", "second"):
    subprocess.run([sys.executable, str(tmp_path / "run.py"), mode, *args,
                    str(tmp_path / f"{mode}.npy")], check=True, timeout=300,
                   env=dict(os.environ, PYTHONPATH=ROOT))
  np.testing.assert_array_equal(np.load(tmp_path / "first.npy"),
                                np.load(tmp_path / "second.npy"))
  # And both equal the uninterrupted in-process stream.
  cfg = data_cfg(prefetch=2)
  it = iter(data.train_dataset(documents, small_tokenizer, cfg, seq_len=31,
                               seed=5))
  take(it, 7)
  np.testing.assert_array_equal(np.stack([b.tokens for b in take(it, 4)]),
                                np.load(tmp_path / "first.npy"))


@pytest.mark.slow
def test_worker_processes_deliver_and_resume(documents, small_tokenizer):
  cfg = data_cfg(worker_count=2, prefetch=2)
  make = lambda: iter(data.train_dataset(documents, small_tokenizer, cfg,
                                         seq_len=SEQ, seed=1))
  it = make()
  take(it, 3)
  state = it.get_state()
  expected = take(it, 4)
  again = make()
  again.set_state(state)
  assert same(take(again, 4), expected)


def test_eval_batches_are_fixed(documents, small_tokenizer):
  a = data.eval_batches(documents[:5], small_tokenizer, data_cfg(), seq_len=SEQ,
                        num_batches=3)
  b = data.eval_batches(documents[:5], small_tokenizer, data_cfg(), seq_len=SEQ,
                        num_batches=3)
  assert len(a) == 3 and same(a, b)


def test_bad_input_fails_before_training(documents, small_tokenizer):
  with pytest.raises(ValueError, match="too few for one batch"):
    data.train_dataset(documents[:2], small_tokenizer, data_cfg(batch_size=64),
                       seq_len=SEQ, seed=0)
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    data.train_dataset(documents, small_tokenizer, data_cfg(), seq_len=SEQ,
                       seed=0, process_count=3)
  with pytest.raises(ValueError, match="held-out split is empty"):
    data.eval_batches([], small_tokenizer, data_cfg(), seq_len=SEQ,
                      num_batches=1)
  # (a bad data.packing is the run config's to refuse: test_run_config.py)


def test_measure_throughput_is_tokens_per_second():
  """The bench's pipeline figure: tokens delivered / wall time, after one
  warm-up batch (checked on an iterator of known pace)."""
  def paced(delay, tokens):
    first = True
    while True:
      if not first:
        time.sleep(delay)
      first = False
      yield Batch(np.zeros(tokens, np.int32))
  rate = data.measure_throughput(paced(0.02, 640), 10)
  assert 0.5 * 640 / 0.02 < rate <= 640 / 0.02
