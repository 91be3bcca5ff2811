"""The fused H-BitLinear input (Eq. 7): RMSNorm -> Hadamard -> per-token
quantize, one pass over the activation, written as int8 codes + f32 scales.

Forward, per token row x [n] (n = K * 2^k, hadamard.py's sizes):
  y = x * rsqrt(mean(x^2) + eps) * s          the BitLinear's own RMSNorm
  z = H_n y / sqrt(n)                         Eq. 3-4, orthonormal
  8 bits: codes = RoundClip(z 127 / max|z|, -128, 127), scale = max|z| / 127
  4 bits: codes = RoundClip(z sqrt7 / mean|z|, -8, 7), scale = mean|z| / sqrt7
The Hadamard is applied in its Kronecker form H_n = H_A (x) H_B on the row
as it lies in memory ([rows, n], no relayout): each lane-aligned chunk of
B = 128 features is multiplied by H_B on the matrix unit, and H_A mixes the
A chunks by a butterfly of sums and differences (and the Paley factor's
signed sums).
Backward, by the paper's STE (Eq. 8): dz = dL/dq, dy = H dz (H symmetric),
then the RMSNorm backward: dx = r (dy s - y^ mean(dy s y^)), r = rsqrt(...),
y^ = x r; ds = sum over tokens of dy y^ (per block, summed after).

Everything in f32 inside the kernel (the Hadamard matmuls as bf16 passes
of an f32 split, exact factors: 2 passes for bf16 inputs, ~16 bits; 3 for
f32, ~24 bits): the jnp path
(layers.BitLinear) rounds y and z to the compute dtype between stages, so
a code can differ where z lies within that rounding of a level boundary
(the tests count them). Rounding is half to even by floor (portable: Triton has no round).

`impl`: "mosaic" (TPU), "interpret" (any backend: the tests).
`supported(n, impl)` says where it applies. A GPU (Triton) version is not
here yet: Pallas' Triton lowering takes 2-D dots only (no batch dimension),
so H_A needs another formulation; GPUs run the jnp stages.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from bitnet_jax import hadamard, quant

IMPLS = ("mosaic", "interpret")
LANES = 128                      # B of the Kronecker view where n allows
VMEM_BUDGET = 4 << 20            # bytes of f32 temporaries per row block
# the kernels' names in a compiled program (scale/hlo_flops.py counts them)
FORWARD_NAME = "bitnet_h_input_fwd"
BACKWARD_NAME = "bitnet_h_input_bwd"


def factors(n: int) -> tuple[int, int]:
  """(A, B) with H_n = H_A (x) H_B: B the largest power of two <= LANES
  dividing n's power-of-two part, A = n / B (the Paley factor goes in A)."""
  _, power = hadamard.check_size(n)
  b = min(power, LANES)
  return n // b, b


def supported(n: int, impl: str) -> bool:
  """Mosaic slices the row in lane-aligned chunks of B = 128 (or takes a
  row of n <= 128 whole); the interpreter takes every hadamard.py size."""
  if impl not in IMPLS or not hadamard.is_supported(n):
    return False
  a, b = factors(n)
  return impl == "interpret" or b == LANES or a == 1


def block_rows(n: int, rows: int) -> int:
  """Rows per grid step: a power of two >= 32 (int8 tiles) that keeps ~8
  f32 row temporaries within VMEM_BUDGET, no more than the rows need."""
  r = 32
  while r * 2 * n * 4 * 8 <= VMEM_BUDGET and r < rows:
    r *= 2
  return r


def mxu_flops(rows: int, n: int, dtype) -> float:
  """Matrix-unit FLOPs of one kernel call (forward or backward) on [rows, n]
  in `dtype`: passes(dtype) bf16 matmuls of every B-chunk by H_B [B, B]
  (the butterfly and Paley sums run on the vector unit: n log2 A adds and
  K n per row, not counted, as XLA's own element-wise work is not)."""
  _, b = factors(n)
  return float(passes(dtype) * 2 * rows * n * b)


def round_half_even(v: jax.Array) -> jax.Array:
  """Nearest integer, ties to even (jnp.round's rule), by floor only."""
  f = jnp.floor(v)
  d = v - f
  odd = (f - 2.0 * jnp.floor(f * 0.5)) != 0
  return jnp.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


def _split(v: jax.Array, parts: int) -> list[jax.Array]:
  """v (f32) as a sum of `parts` bf16 arrays (2: ~16 bits, 3: ~24 bits):
  with the +-1 Hadamard exact in bf16, one single-pass matmul per part
  (Precision.HIGHEST would take six passes)."""
  out = []
  for _ in range(parts):
    part = v.astype(jnp.bfloat16)
    out.append(part)
    v = v - part.astype(jnp.float32)
  return out


def passes(dtype) -> int:
  """bf16 passes per Hadamard matmul: twice the input's mantissa bits at
  least (bf16 and f16 inputs: 2, ~16 bits; f32: 3, ~24 bits)."""
  return 3 if jnp.dtype(dtype) == jnp.float32 else 2


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
    acc = None
    for part in _split(c, parts):
      d = jnp.dot(part, hb, preferred_element_type=jnp.float32)
      acc = d if acc is None else acc + d
    chunks.append(acc)
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
  inv = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True)
                      * np.float32(1.0 / n) + eps)
  z = _rotate(x * inv * s_ref[...], hb_ref[...], n, passes(x_ref.dtype))
  if bits == 8:
    stat = jnp.max(jnp.abs(z), axis=1, keepdims=True)
    level, lo, hi = np.float32(127.0), -128.0, 127.0
  else:
    stat = jnp.sum(jnp.abs(z), axis=1, keepdims=True) * np.float32(1.0 / n)
    level, lo, hi = np.float32(quant.SQRT7), -8.0, 7.0
  q = round_half_even(z * (level / (stat + np.float32(quant.EPS))))
  codes_ref[...] = jnp.clip(q, lo, hi).astype(jnp.int8)
  scale_ref[...] = stat / level


def _backward_kernel(x_ref, s_ref, dz_ref, hb_ref, dx_ref, ds_ref, *,
                     eps: float, n: int):
  x = x_ref[...].astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True)
                      * np.float32(1.0 / n) + eps)
  y_hat = x * inv
  dy = _rotate(dz_ref[...].astype(jnp.float32), hb_ref[...], n,
               passes(dz_ref.dtype))
  dys = dy * s_ref[...]
  mean = jnp.sum(dys * y_hat, axis=1, keepdims=True) * np.float32(1.0 / n)
  dx_ref[...] = (inv * (dys - y_hat * mean)).astype(dx_ref.dtype)
  ds_ref[...] = jnp.sum(dy * y_hat, axis=0, keepdims=True)[None]


def _compiler_params(impl: str):
  if impl == "mosaic":
    from jax.experimental.pallas import tpu as pl_tpu
    return pl_tpu.CompilerParams(dimension_semantics=("parallel",))
  return None


def _call(kernel, name: str, impl: str, grid: int, in_specs, out_specs,
          out_shape, operands):
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(grid,), in_specs=in_specs,
      out_specs=out_specs, interpret=impl == "interpret", name=name,
      compiler_params=_compiler_params(impl))(*operands)


def _padded(v: jax.Array, rows_to: int) -> jax.Array:
  rows = v.shape[0]
  return v if rows == rows_to else jnp.pad(v, ((0, rows_to - rows), (0, 0)))


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
                    eps: float, impl: str) -> tuple[jax.Array, jax.Array]:
  """x [R, n] (any float dtype), the RMSNorm scale [n] -> (int8 codes
  [R, n], f32 scales [R, 1]) of the rotated, normalised rows."""
  if bits not in (8, 4):
    raise ValueError(f"bits must be 8 or 4, got {bits!r}")
  rows, n = x2d.shape
  r, padded, s, hb = _operands(x2d, scale)
  row_spec, scale_spec, h_spec = _specs(r, n, hb.shape[0])
  codes, scales = _call(
      functools.partial(_forward_kernel, bits=bits, eps=float(eps), n=n),
      FORWARD_NAME, impl, padded // r, [row_spec, scale_spec, h_spec],
      [row_spec, pl.BlockSpec((r, 1), lambda i: (i, 0))],
      [jax.ShapeDtypeStruct((padded, n), jnp.int8),
       jax.ShapeDtypeStruct((padded, 1), jnp.float32)],
      (_padded(x2d, padded), s, hb))
  return codes[:rows], scales[:rows]


def input_grads(x2d: jax.Array, scale: jax.Array, dz: jax.Array, *,
                eps: float, impl: str) -> tuple[jax.Array, jax.Array]:
  """The STE backward of `quantized_input`: dL/dz [R, n] (the gradient at
  the quantized activation) -> (dL/dx [R, n] in x's dtype, dL/dscale [n])."""
  rows, n = x2d.shape
  r, padded, s, hb = _operands(x2d, scale)
  row_spec, scale_spec, h_spec = _specs(r, n, hb.shape[0])
  grid = padded // r
  dx, ds = _call(
      functools.partial(_backward_kernel, eps=float(eps), n=n), BACKWARD_NAME,
      impl, grid, [row_spec, scale_spec, row_spec, h_spec],
      [row_spec, pl.BlockSpec((1, 1, n), lambda i: (i, 0, 0))],
      [jax.ShapeDtypeStruct((padded, n), x2d.dtype),
       jax.ShapeDtypeStruct((grid, 1, n), jnp.float32)],
      (_padded(x2d, padded), s, _padded(dz, padded), hb))
  return dx[:rows], jnp.sum(ds, axis=(0, 1))
