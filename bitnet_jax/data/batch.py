"""The training batch, typed: what the pipeline makes and the step reads.

A batch holds rows of seq_len + 1 tokens (position t predicts token t + 1),
so one int32 array per field crosses from host to device; the views below
are what the loss needs:

  tokens       int32 [B, L + 1]
  segment_ids  int32 [B, L + 1] or None: first_fit packing; 0 = padding
  positions    int32 [B, L + 1] or None: first_fit; restart at each document
  inputs / targets           [B, L]: tokens[:, :-1] / tokens[:, 1:]
  input_positions / input_segments   [B, L] or None
  weights      f32 [B, L]: 1 where a target counts (same document, not
               padding); all ones without segments

It is a pytree (flax.struct), so `jax.jit`, shardings and
`jax.make_array_from_process_local_data` take it as a whole.
"""
from __future__ import annotations

from typing import Any

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

FIELDS = ("tokens", "segment_ids", "positions")


@struct.dataclass
class Batch:
  tokens: Any
  segment_ids: Any = None
  positions: Any = None

  @classmethod
  def from_rows(cls, rows: dict) -> "Batch":
    """From a dict of the FIELDS (what grain batches); others are refused."""
    extra = set(rows) - set(FIELDS)
    if extra:
      raise ValueError(f"batch rows have unknown fields {sorted(extra)}")
    return cls(**rows)

  @classmethod
  def abstract(cls, batch_size: int, seq_len: int, packed: bool,
               sharding=None) -> "Batch":
    """ShapeDtypeStructs of a global batch (compiling without data)."""
    spec = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32,
                                sharding=sharding)
    return cls(spec, spec, spec) if packed else cls(spec)

  @property
  def packed(self) -> bool:
    return self.segment_ids is not None

  @property
  def inputs(self):
    return self.tokens[:, :-1]

  @property
  def targets(self):
    return self.tokens[:, 1:]

  @property
  def input_positions(self):
    return None if self.positions is None else self.positions[:, :-1]

  @property
  def input_segments(self):
    return None if self.segment_ids is None else self.segment_ids[:, :-1]

  @property
  def weights(self):
    if self.segment_ids is None:
      return jnp.ones(self.targets.shape, jnp.float32)
    seg = self.segment_ids
    return ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(jnp.float32)

  @property
  def num_tokens(self) -> int:
    return int(np.prod(self.tokens.shape))

  def map(self, fn) -> "Batch":
    """The same fields through fn (e.g. a microbatch slice)."""
    return jax.tree.map(fn, self)
