"""grain pipelines: documents -> tokens -> packed rows -> batches, per process.

Training pipeline (grain Dataset API):
  documents of this process (index i of n takes documents i, i+n, ...)
  -> seeded shuffle, reshuffled every epoch -> repeat
  -> tokenize (a map; the picklable tokenizer loads lazily in each worker)
     adding BOS and EOS
  -> packing into rows of seq_len + 1 tokens:
       concat     concatenate the stream and cut it (GPT-style; documents
                  attend across boundaries, no padding)
       first_fit  split documents longer than a row, then first-fit pack with
                  segment ids (0 = padding) and positions that restart at
                  each document
  -> window shuffle of packed rows (data.shuffle_rows; without it a batch
     holds consecutive chunks of one or two long documents)
  -> batch (global batch / process count rows) -> prefetch (a thread, or
     worker processes when data.worker_count > 0).
Batches are `batch.Batch`es of numpy int32 arrays [batch, seq_len + 1]:
`tokens`, plus `segment_ids` and `positions` with first_fit.

The iterator is a grain DatasetIterator: `get_state()` / `set_state()` (JSON)
resume exactly where it stopped; orbax saves it through grain's
CheckpointHandler (see checkpoint.py).
"""
from __future__ import annotations

import logging
import time
from typing import Iterator, Sequence

from absl import flags
import grain
import grain.experimental as grain_exp
import numpy as np

from bitnet_jax.errors import ConfigError, InputError
from bitnet_jax.data.batch import Batch
from bitnet_jax.data.tokenizer import Tokenizer
from bitnet_jax.run_config import DataConfig



class TokenizeDocument(grain.transforms.Map):
  """str -> {'tokens': int32 [BOS] + ids + [EOS]}."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def map(self, doc: str) -> dict[str, np.ndarray]:
    tok = self.tokenizer
    return {"tokens": np.asarray([tok.bos_id, *tok.encode(doc), tok.eos_id],
                                 dtype=np.int32)}


class SplitLongDocument(grain.experimental.FlatMapTransform):
  """Cut a tokenized document into pieces of at most `row_len` tokens."""

  def __init__(self, row_len: int):
    self.row_len = row_len
    self.max_fan_out = 1 << 30  # iterator flat-maps do not use it

  def flat_map(self, element):
    tokens = element["tokens"]
    return [{"tokens": tokens[i:i + self.row_len]}
            for i in range(0, len(tokens), self.row_len)]


def _rename_rows(element):
  return {"tokens": element["tokens"],
          "segment_ids": element["tokens_segment_ids"],
          "positions": element["tokens_positions"]}


def _tokens_only(element):
  return {"tokens": element["tokens"]}


def _slices_as_tuples(state):
  """JSON turns tuples into lists; grain's concat-then-split compares its
  'no remainder' slice (-1, -1) as a tuple, so a JSON-restored state would
  invent a remainder and shift the stream. Restore the tuples."""
  if isinstance(state, dict):
    return {k: ({kk: tuple(vv) for kk, vv in v.items()}
                if k == "remainder_slices" and isinstance(v, dict)
                else _slices_as_tuples(v)) for k, v in state.items()}
  if isinstance(state, list):
    return [_slices_as_tuples(v) for v in state]
  return state


class _JsonSafeIterator(grain.DatasetIterator):
  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(_slices_as_tuples(state))

  def start_prefetch(self):
    if hasattr(self._parent, "start_prefetch"):
      self._parent.start_prefetch()


class JsonSafeStates(grain.IterDataset):
  """Outermost stage: iterator states survive a JSON round trip (checkpoints)."""

  def __iter__(self):
    return _JsonSafeIterator(self._parent.__iter__())


def per_process_batch(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ConfigError(f"data.batch_size {batch_size} is not divisible by the "
                     f"{process_count} processes")
  return batch_size // process_count


def packed_rows(docs: Sequence[str], tokenizer: Tokenizer, *, row_len: int,
                packing: str, seed: int, shuffle: bool, repeat: bool,
                process_index: int = 0, process_count: int = 1,
                num_bins: int = 16) -> grain.IterDataset:
  """Unbatched rows of `row_len` tokens from this process's documents.

  Rows carry `tokens`, `segment_ids` (0 marks padding, which only the last row
  of a finite stream or first-fit bins have) and `positions`.
  """
  ds = grain.MapDataset.source(docs)[process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(TokenizeDocument(tokenizer))
  it = ds.to_iter_dataset()
  if packing == "concat":
    it = grain_exp.ConcatThenSplitIterDataset(
        it, length_struct={"tokens": row_len})
  else:
    it = grain_exp.FlatMapIterDataset(it, SplitLongDocument(row_len))
    it = grain_exp.FirstFitPackIterDataset(
        it, length_struct={"tokens": row_len}, num_packing_bins=num_bins,
        shuffle_bins=False)
  return it.map(_rename_rows)


def check_enough_tokens(docs: Sequence[str], tokenizer: Tokenizer, need: int,
                        what: str, process_index: int = 0,
                        process_count: int = 1) -> None:
  """Raise unless this process's documents hold at least `need` tokens."""
  have = 0
  for i in range(process_index, len(docs), process_count):
    have += len(tokenizer.encode(docs[i])) + 2
    if have >= need:
      return
  raise InputError(f"{what} holds {have} tokens for process {process_index}, "
                   f"too few for one batch ({need} tokens = batch x "
                   f"(seq_len + 1)); use more data or a smaller batch/seq_len")


def train_dataset(docs: Sequence[str], tokenizer: Tokenizer, data: DataConfig, *,
                  seq_len: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """The infinite, shuffled, packed, batched and prefetched training stream."""
  batch = per_process_batch(data.batch_size, process_count)
  check_enough_tokens(docs, tokenizer, batch * (seq_len + 1),
                      "the training split", process_index, process_count)
  it = packed_rows(docs, tokenizer, row_len=seq_len + 1, packing=data.packing,
                   seed=seed, shuffle=True, repeat=True,
                   process_index=process_index, process_count=process_count,
                   num_bins=batch)
  if data.packing == "concat":  # an infinite stream: never padded
    it = it.map(_tokens_only)
  if data.shuffle_rows > 1:
    it = grain_exp.WindowShuffleIterDataset(it, window_size=data.shuffle_rows,
                                            seed=seed + 1)
  it = it.batch(batch, drop_remainder=True).map(Batch.from_rows)
  if data.worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags in its workers
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.worker_count, per_worker_buffer_size=max(1, data.prefetch)))
  elif data.prefetch > 0:
    it = grain_exp.ThreadPrefetchIterDataset(it, prefetch_buffer_size=data.prefetch)
  return JsonSafeStates(it)


def eval_batches(docs: Sequence[str], tokenizer: Tokenizer, data: DataConfig, *,
                 seq_len: int, num_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[Batch]:
  """A fixed list of held-out batches (the same at every evaluation).

  Documents are read in order (no shuffle); a held-out split smaller than
  num_batches batches is cycled.
  """
  if len(docs) == 0:
    raise InputError("the held-out split is empty; raise data.eval_fraction")
  batch = per_process_batch(data.batch_size, process_count)
  check_enough_tokens(docs, tokenizer, seq_len + 1, "the held-out split",
                      process_index, process_count)
  rows = packed_rows(docs, tokenizer, row_len=seq_len + 1, packing=data.packing,
                     seed=0, shuffle=False, repeat=True,
                     process_index=process_index, process_count=process_count,
                     num_bins=batch)
  if data.packing == "concat":
    rows = rows.map(_tokens_only)
  it = iter(rows.batch(batch, drop_remainder=True))
  return [Batch.from_rows(next(it)) for _ in range(num_batches)]


def measure_throughput(iterator: Iterator[Batch], num_batches: int) -> float:
  """Tokens per second the iterator delivers (after one warm-up batch)."""
  next(iterator)
  start, tokens = time.perf_counter(), 0
  for _ in range(num_batches):
    tokens += next(iterator).num_tokens
  rate = tokens / (time.perf_counter() - start)
  logging.info("data pipeline: %.0f tokens/s", rate)
  return rate
