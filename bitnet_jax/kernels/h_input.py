"""The fused H-BitLinear input (Eq. 7): RMSNorm -> Hadamard -> per-token
quantize, one pass over the activation, written as int8 codes + f32 scales.

Forward, per token row x [n] (n = K * 2^k, hadamard.py's sizes):
  y = x * rsqrt(mean(x^2) + eps) * s          the BitLinear's own RMSNorm
  z = H_n y / sqrt(n)                         Eq. 3-4, orthonormal
  8 bits: codes = RoundClip(z 127 / max|z|, -128, 127), scale = max|z| / 127
  4 bits: codes = RoundClip(z sqrt7 / mean|z|, -8, 7), scale = mean|z| / sqrt7
Backward, by the paper's STE (Eq. 8): dz = dL/dq, dy = H dz (H symmetric),
then the RMSNorm backward: dx = r (dy s - y^ mean(dy s y^)), r = rsqrt(...),
y^ = x r; ds = sum over tokens of dy y^ (per block, summed after).

Everything in f32 inside the kernel (the Hadamard matmuls as bf16 passes
of an f32 split, exact factors: 2 passes for bf16 inputs, ~16 bits; 3 for
f32, ~24 bits): the jnp path (layers.BitLinear) rounds y and z to the
compute dtype between stages, so a code can differ where z lies within
that rounding of a level boundary (the tests count them).

`impl`: "mosaic" (TPU: h_input_mosaic.py), "triton" (NVIDIA GPU:
h_input_triton.py), "interpret" / "triton_interpret" (either kernel's body
through Pallas' interpreter, on any backend: the tests' path).
`supported(n, impl)` says where each applies.
"""
from __future__ import annotations

import jax

from bitnet_jax.kernels import h_input_mosaic, h_input_triton, row_math

IMPLS = ("mosaic", "interpret", "triton", "triton_interpret")
FORWARD_NAME = row_math.FORWARD_NAME
BACKWARD_NAME = row_math.BACKWARD_NAME
# compiled-program custom-call target -> the impl that emits it
TARGET_IMPLS = {"tpu_custom_call": "mosaic", "__gpu$xla.gpu.triton": "triton"}


def _module(impl: str):
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  return h_input_triton if impl.startswith("triton") else h_input_mosaic


def _interpret(impl: str) -> bool:
  return impl in ("interpret", "triton_interpret")


def supported(n: int, impl: str) -> bool:
  if impl not in IMPLS:
    return False
  if impl.startswith("triton"):
    return h_input_triton.supported(n)
  return h_input_mosaic.supported(n, interpret=_interpret(impl))


def mxu_flops(rows: int, n: int, dtype, impl: str = "mosaic",
              backward: bool = False) -> float:
  """Matrix-unit FLOPs of one kernel call (forward or backward) on [rows, n]
  in `dtype` (the Hadamard's bf16 passes; the vector work is not counted,
  as XLA's own element-wise work is not)."""
  return _module(impl).mxu_flops(rows, n, dtype, backward)


def quantized_input(x2d: jax.Array, scale: jax.Array, *, bits: int,
                    eps: float, impl: str) -> tuple[jax.Array, jax.Array]:
  """x [R, n] (any float dtype), the RMSNorm scale [n] -> (int8 codes
  [R, n], f32 scales [R, 1]) of the rotated, normalised rows."""
  if bits not in (8, 4):
    raise ValueError(f"bits must be 8 or 4, got {bits!r}")
  return _module(impl).quantized_input(x2d, scale, bits=bits, eps=eps,
                                       interpret=_interpret(impl))


def input_grads(x2d: jax.Array, scale: jax.Array, dz: jax.Array, *,
                eps: float, impl: str) -> tuple[jax.Array, jax.Array]:
  """The STE backward of `quantized_input`: dL/dz [R, n] (the gradient at
  the quantized activation) -> (dL/dx [R, n] in x's dtype, dL/dscale [n])."""
  return _module(impl).input_grads(x2d, scale, dz, eps=eps,
                                   interpret=_interpret(impl))

