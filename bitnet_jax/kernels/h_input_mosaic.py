"""The fused H-BitLinear input on TPU (Pallas Mosaic): RMSNorm -> Hadamard
-> per-token quantize, one pass over the activation (kernels/h_input.py has
the equations and the public functions).

The Hadamard is applied in its Kronecker form H_n = H_A (x) H_B on the row
as it lies in memory ([rows, n], no relayout): each lane-aligned chunk of
B = 128 features is multiplied by H_B on the matrix unit, and H_A mixes the
A chunks by a butterfly of sums and differences (and the Paley factor's
signed sums). A block of rows per grid step; every hadamard.py size whose
power-of-two part is >= 128 (or n <= 128) compiles; `interpret=True` runs
every size (the tests' path on CPU).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pl_tpu

from bitnet_jax import hadamard
from bitnet_jax.kernels import row_math

LANES = 128                      # B of the Kronecker view where n allows
VMEM_BUDGET = 4 << 20            # bytes of f32 temporaries per row block


def factors(n: int) -> tuple[int, int]:
  """(A, B) with H_n = H_A (x) H_B: B the largest power of two <= LANES
  dividing n's power-of-two part, A = n / B (the Paley factor goes in A)."""
  _, power = hadamard.check_size(n)
  b = min(power, LANES)
  return n // b, b


def supported(n: int, interpret: bool = False) -> bool:
  """Mosaic slices the row in lane-aligned chunks of B = 128 (or takes a
  row of n <= 128 whole); the interpreter takes every hadamard.py size."""
  if not hadamard.is_supported(n):
    return False
  a, b = factors(n)
  return interpret or b == LANES or a == 1


def block_rows(n: int, rows: int) -> int:
  """Rows per grid step: a power of two >= 32 (int8 tiles) that keeps ~8
  f32 row temporaries within VMEM_BUDGET, no more than the rows need."""
  r = 32
  while r * 2 * n * 4 * 8 <= VMEM_BUDGET and r < rows:
    r *= 2
  return r


def mxu_flops(rows: int, n: int, dtype, backward: bool = False) -> float:
  """Matrix-unit FLOPs of one kernel call on [rows, n] in `dtype`: bf16
  passes (row_math.passes for the forward's f32 operand, operand_passes for
  the backward's dL/dq) of every B-chunk by H_B [B, B] (the butterfly and
  Paley sums run on the vector unit: n log2 A adds and K n per row, not
  counted, as XLA's own element-wise work is not)."""
  _, b = factors(n)
  passes = (row_math.operand_passes if backward else row_math.passes)(dtype)
  return float(passes * 2 * rows * n * b)


def _rotate(v: jax.Array, hb: jax.Array, n: int, parts: int) -> jax.Array:
  """H_n v / sqrt(n) for the rows of v [r, n] (f32), in lane-aligned
  chunks: chunk a = v[:, aB:(a+1)B] times H_B (the MXU, hb the +-1 factor
  in bf16), then H_A = P_K (x) S_{A/K} across chunks: a butterfly of chunk
  sums and differences (Sylvester), the Paley factor as signed sums."""
  a_count, b = n // hb.shape[0], hb.shape[0]
  k_order = hadamard.split_size(n)[0]
  chunks = []
  for a in range(a_count):
    c = v[:, a * b:(a + 1) * b]
    chunks.append(row_math.split_dot(c, hb, parts))
  group, h = a_count // k_order, 1
  while h < group:  # natural-order butterfly, pairs (j, j + h)
    for start in range(0, a_count, 2 * h):
      for j in range(start, start + h):
        chunks[j], chunks[j + h] = (chunks[j] + chunks[j + h],
                                    chunks[j] - chunks[j + h])
    h *= 2
  if k_order > 1:  # chunk index a = k * group + s
    paley = hadamard.paley_matrix(k_order)
    mixed = list(chunks)
    for s in range(group):
      for k in range(k_order):
        acc = None
        for k2 in range(k_order):
          c = chunks[k2 * group + s]
          acc = (c if paley[k, k2] > 0 else -c) if acc is None else (
              acc + c if paley[k, k2] > 0 else acc - c)
        mixed[k * group + s] = acc
    chunks = mixed
  out = chunks[0] if a_count == 1 else jnp.concatenate(chunks, axis=1)
  return out * np.float32(1.0 / math.sqrt(n))


def _forward_kernel(x_ref, s_ref, hb_ref, codes_ref, scale_ref, *,
                    bits: int, eps: float, n: int):
  x = x_ref[...].astype(jnp.float32)
  inv = row_math.inv_rms(x, n, eps, axis=1)
  z = _rotate(x * inv * s_ref[...], hb_ref[...], n,
              row_math.passes(x_ref.dtype))
  codes_ref[...], scale_ref[...] = row_math.quantize(z, bits, n, axis=1)


def _backward_kernel(x_ref, s_ref, dz_ref, hb_ref, dx_ref, ds_ref, *,
                     eps: float, n: int):
  x = x_ref[...].astype(jnp.float32)
  inv = row_math.inv_rms(x, n, eps, axis=1)
  y_hat = x * inv
  dy = _rotate(dz_ref[...].astype(jnp.float32), hb_ref[...], n,
               row_math.operand_passes(dz_ref.dtype))  # dL/dq as it comes
  dys = dy * s_ref[...]
  mean = jnp.sum(dys * y_hat, axis=1, keepdims=True) * np.float32(1.0 / n)
  dx_ref[...] = (inv * (dys - y_hat * mean)).astype(dx_ref.dtype)
  ds_ref[...] = jnp.sum(dy * y_hat, axis=0, keepdims=True)[None]


def _call(kernel, name: str, interpret: bool, grid: int, in_specs, out_specs,
          out_shape, operands):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(grid,), in_specs=in_specs,
      out_specs=out_specs, interpret=interpret, name=name,
      compiler_params=None if interpret else pl_tpu.CompilerParams(
          dimension_semantics=("parallel",)))(*operands)


def _operands(x2d: jax.Array, scale: jax.Array):
  """(row block r, padded rows, scale [1, n] f32, H_B in bf16)."""
  rows, n = x2d.shape
  _, b = factors(n)
  r = block_rows(n, rows)
  return (r, -(-rows // r) * r, scale.astype(jnp.float32).reshape(1, n),
          jnp.asarray(hadamard.sylvester_matrix(b), jnp.bfloat16))


def _specs(r: int, n: int, b: int):
  whole = lambda *shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  return pl.BlockSpec((r, n), lambda i: (i, 0)), whole(1, n), whole(b, b)


def quantized_input(x2d: jax.Array, scale: jax.Array, *, bits: int,
                    eps: float, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """x [R, n] (any float dtype), the RMSNorm scale [n] -> (int8 codes
  [R, n], f32 scales [R, 1]) of the rotated, normalised rows."""
  rows, n = x2d.shape
  r, padded, s, hb = _operands(x2d, scale)
  row_spec, scale_spec, h_spec = _specs(r, n, hb.shape[0])
  codes, scales = _call(
      functools.partial(_forward_kernel, bits=bits, eps=float(eps), n=n),
      row_math.FORWARD_NAME, interpret, padded // r, [row_spec, scale_spec, h_spec],
      [row_spec, pl.BlockSpec((r, 1), lambda i: (i, 0))],
      [jax.ShapeDtypeStruct((padded, n), jnp.int8),
       jax.ShapeDtypeStruct((padded, 1), jnp.float32)],
      (row_math.pad_rows(x2d, padded), s, hb))
  return codes[:rows], scales[:rows]


def input_grads(x2d: jax.Array, scale: jax.Array, dz: jax.Array, *,
                eps: float, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """The STE backward of `quantized_input`: dL/dz [R, n] (the gradient at
  the quantized activation) -> (dL/dx [R, n] in x's dtype, dL/dscale [n])."""
  rows, n = x2d.shape
  r, padded, s, hb = _operands(x2d, scale)
  row_spec, scale_spec, h_spec = _specs(r, n, hb.shape[0])
  grid = padded // r
  dx, ds = _call(
      functools.partial(_backward_kernel, eps=float(eps), n=n), row_math.BACKWARD_NAME,
      interpret, grid, [row_spec, scale_spec, row_spec, h_spec],
      [row_spec, pl.BlockSpec((1, 1, n), lambda i: (i, 0, 0))],
      [jax.ShapeDtypeStruct((padded, n), x2d.dtype),
       jax.ShapeDtypeStruct((grid, 1, n), jnp.float32)],
      (row_math.pad_rows(x2d, padded), s, row_math.pad_rows(dz, padded), hb))
  return dx[:rows], jnp.sum(ds, axis=(0, 1))
