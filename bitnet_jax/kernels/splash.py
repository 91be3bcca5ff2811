"""Causal self-attention by the Pallas TPU splash kernel (jax's
`splash_attention`): blocked flash attention that never materialises the
[heads, T, T] scores, with first-fit packed documents as SegmentIds and
GQA (a query head h reads KV head h // (heads / kv_heads), the model's
order). The forward and both backward kernels (dq, dkv) are the library's;
this module sizes the blocks, runs them per batch (and head) shard under
the mesh in context (`shard_map`: a Pallas call is opaque to the
partitioner) and scales the queries (splash does not).

Block sizes: 512 on every TPU generation (the size the kernel's authors and
MaxText use on v4-v6e; 128 is the kernel's own default), at most the
sequence; `model.attention_block` overrides. `applies` says where it runs:
a sequence that is a multiple of 128 (the kernel's lane tiles).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.sharding import PartitionSpec as P

from bitnet_jax import partitioning

DEFAULT_BLOCK = 512
LANES = 128


def applies(seq_len: int) -> bool:
  return seq_len > 0 and seq_len % LANES == 0


def block_size(seq_len: int, block: int = 0) -> int:
  """The block along the sequence: `block` (or DEFAULT_BLOCK), at most the
  sequence, a multiple of 128 that divides it."""
  if not applies(seq_len):
    raise ValueError(f"splash attention tiles the sequence by {LANES}; "
                     f"length {seq_len} is not a multiple")
  b = max(LANES, min(block or DEFAULT_BLOCK, seq_len) // LANES * LANES)
  while seq_len % b:
    b -= LANES
  return b


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, seq_len: int, block: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  b = block_size(seq_len, block)
  sizes = splash.BlockSizes(
      block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
      block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def _head_axis(heads: int, kv_heads: int):
  """The mesh axis splitting the heads (tensor parallelism), if it divides
  both head counts; None otherwise."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return None
  axis = nn.logical_to_mesh_axes(("heads",), rules)[0]
  size = mesh.shape.get(axis, 1) if isinstance(axis, str) else 1
  return axis if size > 1 and heads % size == 0 and kv_heads % size == 0 \
      else None


def attention(q_BLHE: jax.Array, k_BLKE: jax.Array, v_BLKE: jax.Array,
              segment_ids_BL: jax.Array | None = None, block: int = 0,
              interpret: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(E) + causal [+ same segment]) v, [B, L, H, E]."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  b, seq, heads, e = q_BLHE.shape
  kv_heads = k_BLKE.shape[2]
  tokens = partitioning.token_axes(b) or None
  head_axis = _head_axis(heads, kv_heads)
  shards = 1 if head_axis is None else \
      jax.sharding.get_abstract_mesh().shape[head_axis]

  def local(q, k, v, seg):
    kernel = _kernel(heads // shards, seq, block, interpret)
    q = (q * (1.0 / math.sqrt(e))).astype(q.dtype).transpose(0, 2, 1, 3)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if seg is None:
      out = jax.vmap(kernel)(q, k, v)
    else:
      out = jax.vmap(lambda q, k, v, s: kernel(
          q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)

  if tokens is None and head_axis is None:
    return local(q_BLHE, k_BLKE, v_BLKE, segment_ids_BL)
  spec = P(tokens, None, head_axis, None)
  seg_spec = P(tokens, None)
  if segment_ids_BL is None:
    fn = jax.shard_map(lambda q, k, v: local(q, k, v, None),
                       in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)
    return fn(q_BLHE, k_BLKE, v_BLKE)
  fn = jax.shard_map(local, in_specs=(spec, spec, spec, seg_spec),
                     out_specs=spec, check_vma=False)
  return fn(q_BLHE, k_BLKE, v_BLKE, segment_ids_BL.astype(jnp.int32))
