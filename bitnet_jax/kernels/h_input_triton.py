"""The fused H-BitLinear input on NVIDIA GPUs (Pallas' Triton lowering):
RMSNorm -> Hadamard -> per-token quantize, one pass over the activation
(kernels/h_input.py has the equations and the public functions).

Triton takes 2-D dots of power-of-two tiles and cannot slice a tile it
holds, so the row is viewed as the matrix X [A, B] it is in memory
(n = A * B, row-major: a free reshape) and the Hadamard is two matmuls,
H_n x = vec(H_A X H_B) (H_n = H_A (x) H_B, Sylvester, both symmetric):
X . H_B [B, B], then H_A [A, A] . (that), each as bf16 passes of an f32
split (row_math.split_dot) on the tensor cores. A and B are the square-ish
split of n (64 x 64 for 4096, 128 x 128 for 16384). A program loops over
ROWS tokens, so H_A and H_B are loaded once per ROWS rows and the
backward's d(norm scale) is summed in registers, one partial per program.
Sizes: powers of two from MIN_N to MAX_N (Paley sizes take the jnp
stages; below 16 x 16 Triton runs the dots on the CUDA cores).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from bitnet_jax import hadamard
from bitnet_jax.kernels import row_math

MIN_N, MAX_N = 16, 16384          # 4 x 4 .. 128 x 128
ROWS = 16                        # tokens per program


def supported(n: int) -> bool:
  return MIN_N <= n <= MAX_N and n & (n - 1) == 0


def factors(n: int) -> tuple[int, int]:
  """(A, B), n = A * B, A = 2^floor(k/2) <= B (n = 2^k)."""
  a = 1 << (n.bit_length() - 1) // 2
  return a, n // a


def mxu_flops(rows: int, n: int, dtype, backward: bool = False) -> float:
  """Tensor-core FLOPs of one call on [rows, n]: X [A, B] . H_B, then
  H_A . [A, B] per row, each in bf16 passes (row_math: the forward splits
  both f32 operands; the backward's first operand, dL/dq, comes in dtype)."""
  a, b = factors(n)
  first = (row_math.operand_passes if backward else row_math.passes)(dtype)
  return float(2 * rows * n * (first * b + row_math.passes(dtype) * a))


def _num_warps(n: int) -> int:
  """Warps per program: an [A, B] f32 tile is n / (32 * warps) registers a
  thread; 4 warps to 4096, 8 above. ptxas (sm_90a) fits both kernels in
  its 255 registers without spilling up to 8192; the 16384 backward spills
  76 bytes a thread (16 warps, at 128 registers each, spill more)."""
  return 4 if n <= 4096 else 8


def _rotate(v: jax.Array, ha: jax.Array, hb: jax.Array,
            parts: tuple[int, int], n: int) -> jax.Array:
  """vec(H_A V H_B) / sqrt(n) = H_n vec(V) / sqrt(n), V [A, B] f32; parts:
  bf16 passes of the first and the second matmul."""
  y = row_math.split_dot(v, hb, parts[0])
  z = row_math.split_dot(y, ha, parts[1], h_left=True)
  return z * np.float32(1.0 / math.sqrt(n))


def _forward_kernel(x_ref, s_ref, ha_ref, hb_ref, codes_ref, scale_ref, *,
                    bits: int, eps: float, n: int):
  parts = row_math.passes(x_ref.dtype)  # y = x r s is f32: split it

  def row(i, carry):  # s, H_A, H_B re-read per row (L1 / L2): fewer live
    x = x_ref[i].astype(jnp.float32)  # registers than holding the tiles
    y = x * row_math.inv_rms(x, n, eps, axis=None) * s_ref[...]
    z = _rotate(y, ha_ref[...], hb_ref[...], (parts, parts), n)
    codes, scale = row_math.quantize(z, bits, n, axis=None)
    codes_ref[i] = codes
    scale_ref[pl.ds(i, 1), :] = scale
    return carry
  jax.lax.fori_loop(0, x_ref.shape[0], row, 0)


def _backward_kernel(x_ref, s_ref, dz_ref, ha_ref, hb_ref, dx_ref, ds_ref, *,
                     eps: float, n: int):
  parts = (row_math.operand_passes(dz_ref.dtype),  # dL/dq as it comes
           row_math.passes(dz_ref.dtype))           # an f32 product

  def row(i, carry):
    dy = _rotate(dz_ref[i].astype(jnp.float32), ha_ref[...], hb_ref[...],
                 parts, n)
    x = x_ref[i].astype(jnp.float32)
    inv = row_math.inv_rms(x, n, eps, axis=None)
    y_hat = x * inv
    dys = dy * s_ref[...]
    mean = jnp.sum(dys * y_hat) * np.float32(1.0 / n)
    dx_ref[i] = (inv * (dys - y_hat * mean)).astype(dx_ref.dtype)
    # the program's d(scale) partial is summed in its output block (L2),
    # not carried: at 128 x 128 a carried tile would spill the registers
    ds_ref[...] += dy * y_hat
    return carry
  ds_ref[...] = jnp.zeros(ds_ref.shape, jnp.float32)
  jax.lax.fori_loop(0, x_ref.shape[0], row, 0)


def _call(kernel, name, interpret, n, grid, in_specs, out_specs, out_shape,
          operands):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(grid,), in_specs=in_specs,
      out_specs=out_specs, interpret=interpret, name=name,
      compiler_params=None if interpret else pl_triton.CompilerParams(
          num_warps=_num_warps(n), num_stages=1))(*operands)


def _operands(x2d: jax.Array, scale: jax.Array):
  """(padded rows, (A, B), the norm scale [A, B] f32, H_A, H_B in bf16)."""
  rows, n = x2d.shape
  a, b = factors(n)
  sylvester = lambda m: jnp.asarray(hadamard.sylvester_matrix(m),
                                    jnp.bfloat16)
  return (-(-rows // ROWS) * ROWS, (a, b),
          scale.astype(jnp.float32).reshape(a, b), sylvester(a), sylvester(b))


def _specs(a: int, b: int):
  whole = lambda *shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  return (pl.BlockSpec((ROWS, a, b), lambda i: (i, 0, 0)), whole(a, b),
          whole(a, a), whole(b, b))


def quantized_input(x2d: jax.Array, scale: jax.Array, *, bits: int,
                    eps: float, interpret: bool) -> tuple[jax.Array, jax.Array]:
  rows, n = x2d.shape
  padded, (a, b), s, ha, hb = _operands(x2d, scale)
  row_spec, s_spec, ha_spec, hb_spec = _specs(a, b)
  codes, scales = _call(
      functools.partial(_forward_kernel, bits=bits, eps=float(eps), n=n),
      row_math.FORWARD_NAME, interpret, n, padded // ROWS,
      [row_spec, s_spec, ha_spec, hb_spec],
      [row_spec, pl.BlockSpec((ROWS, 1), lambda i: (i, 0))],
      [jax.ShapeDtypeStruct((padded, a, b), jnp.int8),
       jax.ShapeDtypeStruct((padded, 1), jnp.float32)],
      (row_math.pad_rows(x2d, padded).reshape(padded, a, b), s, ha, hb))
  return codes.reshape(padded, n)[:rows], scales[:rows]


def input_grads(x2d: jax.Array, scale: jax.Array, dz: jax.Array, *,
                eps: float, interpret: bool) -> tuple[jax.Array, jax.Array]:
  rows, n = x2d.shape
  padded, (a, b), s, ha, hb = _operands(x2d, scale)
  row_spec, s_spec, ha_spec, hb_spec = _specs(a, b)
  grid = padded // ROWS
  view = lambda v: row_math.pad_rows(v, padded).reshape(padded, a, b)
  dx, ds = _call(
      functools.partial(_backward_kernel, eps=float(eps), n=n),
      row_math.BACKWARD_NAME, interpret, n, grid,
      [row_spec, s_spec, row_spec, ha_spec, hb_spec],
      [row_spec, pl.BlockSpec((None, a, b), lambda i: (i, 0, 0))],
      [jax.ShapeDtypeStruct((padded, a, b), x2d.dtype),
       jax.ShapeDtypeStruct((grid, a, b), jnp.float32)],
      (view(x2d), s, view(dz), ha, hb))
  return dx.reshape(padded, n)[:rows], jnp.sum(ds, axis=0).reshape(n)
