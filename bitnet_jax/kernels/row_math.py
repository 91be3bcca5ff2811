"""What the fused H-BitLinear input kernels (Mosaic and Triton) share: exact
rounding without a round instruction, the bf16 split that makes a
single-pass matrix unit exact enough for a +-1 Hadamard, the RMSNorm
statistic and the per-token quantizer of Eq. 5-6 (these run inside a
kernel body: f32 in, f32 / int8 out); the kernels' names and row padding."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import quant

# the kernels' names in a compiled program (scale/hlo_flops.py counts them)
FORWARD_NAME = "bitnet_h_input_fwd"
BACKWARD_NAME = "bitnet_h_input_bwd"


def pad_rows(v: jax.Array, rows_to: int) -> jax.Array:
  """v [rows, ...] zero-padded to rows_to rows (a whole number of blocks)."""
  rows = v.shape[0]
  if rows == rows_to:
    return v
  return jnp.pad(v, ((0, rows_to - rows),) + ((0, 0),) * (v.ndim - 1))


def round_half_even(v: jax.Array) -> jax.Array:
  """Nearest integer, ties to even (jnp.round's rule), by floor only
  (Triton has no round)."""
  f = jnp.floor(v)
  d = v - f
  odd = (f - 2.0 * jnp.floor(f * 0.5)) != 0
  return jnp.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


def passes(dtype) -> int:
  """bf16 passes per Hadamard matmul: twice the input's mantissa bits at
  least (bf16 and f16 inputs: 2, ~16 bits; f32: 3, ~24 bits)."""
  return 3 if jnp.dtype(dtype) == jnp.float32 else 2


def operand_passes(dtype) -> int:
  """bf16 passes for a matmul operand that arrives in `dtype` as it is (the
  backward's dL/dq): a bf16 operand is exact in one; others as `passes`."""
  return 1 if jnp.dtype(dtype) == jnp.bfloat16 else passes(dtype)


def split_bf16(v: jax.Array, parts: int) -> list[jax.Array]:
  """v (f32) as a sum of `parts` bf16 arrays (2: ~16 bits, 3: ~24 bits):
  with the +-1 Hadamard exact in bf16, one single-pass matmul per part
  (Precision.HIGHEST would take six passes)."""
  out = []
  for _ in range(parts):
    part = v.astype(jnp.bfloat16)
    out.append(part)
    v = v - part.astype(jnp.float32)
  return out


def split_dot(v: jax.Array, h: jax.Array, parts: int, *,
              h_left: bool = False) -> jax.Array:
  """v @ h (or h @ v) in f32 for a bf16 +-1 matrix h, one bf16 matmul
  per part of v's split."""
  acc = None
  for part in split_bf16(v, parts):
    d = (jnp.dot(h, part, preferred_element_type=jnp.float32) if h_left else
         jnp.dot(part, h, preferred_element_type=jnp.float32))
    acc = d if acc is None else acc + d
  return acc


def quantize(z: jax.Array, bits: int, n: int,
             axis) -> tuple[jax.Array, jax.Array]:
  """Rotated rows z (f32) -> (int8 codes, f32 scale) per token, the token
  being `axis` (None: the whole block is one token):
  8 bits: RoundClip(z 127 / max|z|, -128, 127), scale = max|z| / 127
  4 bits: RoundClip(z sqrt7 / mean|z|, -8, 7), scale = mean|z| / sqrt7."""
  if bits == 8:
    stat = jnp.max(jnp.abs(z), axis=axis, keepdims=True)
    level, lo, hi = np.float32(127.0), -128.0, 127.0
  else:
    stat = jnp.sum(jnp.abs(z), axis=axis, keepdims=True) * np.float32(1 / n)
    level, lo, hi = np.float32(quant.SQRT7), -8.0, 7.0
  q = round_half_even(z * (level / (stat + np.float32(quant.EPS))))
  return jnp.clip(q, lo, hi).astype(jnp.int8), stat / level


def inv_rms(x: jax.Array, n: int, eps: float, axis) -> jax.Array:
  """rsqrt(mean(x^2) + eps) per token (axis None: the whole block)."""
  return jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True)
                       * np.float32(1.0 / n) + eps)
