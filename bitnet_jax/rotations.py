"""The rotation stage of the linear pipeline: what multiplies a layer's input
(and, where fused, its weights) before quantization.

Kinds (`ROTATIONS`):
  none                     no rotation
  activation               H-BitLinear (Eq. 7): Q_x(H x), the paper's choice
  weight_and_activation    Table 5 ablation: Q_w(H W) Q_x(H x), so that the
                           float layer computes W x
  random_hadamard          QuaRot baseline: R = diag(s) H, the layer holds the
                           signs s [in]
  learned                  SpinQuant baseline: a dense learned R [in, in]

The post-training rotations act in row-vector form x -> x R; `fused` layers
hold R^T W as their kernel, unfused ones undo R after quantizing x (Table 4).
H is orthonormal and symmetric, so the Hadamard kinds need no inverse here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bitnet_jax import hadamard
from bitnet_jax import partitioning

HADAMARD_KINDS = ("activation", "weight_and_activation")
PTQ_KINDS = ("random_hadamard", "learned")
ROTATIONS = ("none",) + HADAMARD_KINDS + PTQ_KINDS


def contract(x: jax.Array, w: jax.Array) -> jax.Array:
  """x[..., in] . w[in, *out] -> [..., *out]."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def hadamard_input(x: jax.Array, block_size: int,
                   logical_axis: str | None) -> jax.Array:
  """The layer-input Hadamard. When tensor parallelism splits the feature
  axis (the W_o / W_down inputs: heads, mlp), the distributed FWHT: local
  butterflies and one cross-shard stage instead of gathering the activation."""
  split = partitioning.feature_split(logical_axis, x.shape[0]) if x.ndim > 1 else None
  if split and hadamard.shardable(x.shape[-1], split[1]):
    axis, shards, batch_axes = split
    return hadamard.fwht_sharded(x, axis, shards, block_size, batch_axes)
  return hadamard.fwht(x, block_size)


def rotate_input_axis(w: jax.Array, block_size: int) -> jax.Array:
  """The orthonormal Hadamard along the input axis (axis 0) of w[in, *out]."""
  flat = w.reshape(w.shape[0], -1)
  return hadamard.fwht(flat.T, block_size).T.reshape(w.shape)


def random_signs(key: jax.Array, n: int) -> jax.Array:
  """A random diagonal of +-1 (float32)."""
  return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0)


def hadamard_matrix(signs: jax.Array, block_size: int) -> jax.Array:
  """The dense R = diag(signs) H of a random Hadamard rotation."""
  return hadamard.fwht(jnp.diag(signs.astype(jnp.float32)), block_size)


def ptq_rotate(x: jax.Array, kind: str, rot: jax.Array, block_size: int):
  """x R along the last axis (rot: signs for random_hadamard, R for learned)."""
  if kind == "random_hadamard":
    return hadamard.fwht(x * rot.astype(x.dtype), block_size)
  return contract(x, rot.astype(x.dtype))


def ptq_unrotate(x: jax.Array, kind: str, rot: jax.Array, block_size: int):
  """x R^T along the last axis."""
  if kind == "random_hadamard":
    return hadamard.fwht(x, block_size) * rot.astype(x.dtype)
  return contract(x, rot.T.astype(x.dtype))


def fuse_kernel(w: jax.Array, kind: str, rot: jax.Array, block_size: int):
  """R^T W for a kernel w [in, *out] (float32): (R^T W)^T = W^T R."""
  flat = w.reshape(w.shape[0], -1)
  return ptq_rotate(flat.T, kind, rot, block_size).T.reshape(w.shape)
