"""Integer matmuls of a quantized projection: Q_x(x) . Q_w(W) computed as
int8 activation codes x int8 ternary codes with exact int32 accumulation, the
two scales applied afterwards.

  integer_matmul(x_codes, w_codes)    the int32 product (inference on
                                      exported codes, and the forward below)
  ste_integer_matmul(x, w, ...)       training (quant.train_matmul='int8'):
                                      the forward above on codes computed from
                                      the float input and the latent kernel;
                                      the backward is the paper's STE, the same
                                      gradients as the fake-quantized float
                                      path: dx = g . Q_w(W)^T,
                                      dW = Q_x(x)^T . g (compute dtype)

Where the forward meets FSDP: the ternary codes are computed from the
kernel's shards (the absmean is one reduction over them), so what the
partitioner gathers for the matmul is the int8 codes, not the float kernel.
The residuals are int8 codes: the activations' (with their per-token scales,
not the float activations) and the gathered weight's, so the backward
gathers nothing more (under full remat the recomputed forward gathers once
more, as the float path does).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bitnet_jax import quant


def integer_matmul(x_codes: jax.Array, w_codes: jax.Array) -> jax.Array:
  """int8 activation codes [..., in] . int8 ternary codes [in, *out], exact
  int32 accumulation."""
  return jax.lax.dot_general(x_codes, w_codes,
                             (((x_codes.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.int32)


def scale_product(acc: jax.Array, x_scale: jax.Array, w_scale: jax.Array,
                  groups, out_ndim: int, sums_dtype=jnp.float32) -> jax.Array:
  """acc [..., *out] (int32) times the per-token scales x_scale [..., 1] and
  the weight scale (a scalar, or per projection along the output axes), in
  f32. sums_dtype: what the integer sums are rounded to first. Training
  passes the layer's output dtype: in bf16 that is one more bf16 rounding
  (relative 2^-9, as the output's own), and it lets the GEMM write its
  result in 2 bytes instead of 4: the convert fuses into the GEMM, the
  scaling, which XLA fuses into the consumer, then reads half the bytes."""
  if groups is not None:  # groups index the kernel [in, *out]: axis - 1 here
    axis, segments = groups
    w_scale = quant.spread(w_scale, (axis - 1, segments), out_ndim)
  x_scale = x_scale.reshape(*x_scale.shape[:-1], *([1] * out_ndim))
  return acc.astype(sums_dtype).astype(jnp.float32) * (x_scale * w_scale)


def kernel_codes(w, groups, layouts):
  """Ternary codes of the latent kernel, computed where it is stored and
  then moved to the matmul layout (layouts: partitioning.matmul_layouts), so
  that the FSDP gather moves int8 codes, not float weights."""
  codes, alpha = quant.ternary_codes(w, groups)
  if layouts is not None:
    stored, gathered = layouts
    codes = jax.lax.with_sharding_constraint(codes, stored)
    codes = jax.lax.with_sharding_constraint(codes, gathered)
  return codes, alpha


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def ste_integer_matmul(x: jax.Array, w: jax.Array, bits: int, groups,
                       dtype, layouts=None) -> jax.Array:
  """Q_x(x) . Q_w(W) [..., *out] in `dtype`: integer forward, STE backward.

  x [..., in] float (rotated, sparsified as the layer does), w [in, *out] the
  latent kernel; bits 8 (Eq. 5) or 4 (Eq. 6); groups: per-projection scales
  (quant.ScaleGroups) or None; layouts: (stored, gathered)
  PartitionSpecs of the kernel (partitioning.matmul_layouts) or None."""
  return _forward(x, w, bits, groups, dtype, layouts)[0]


def _forward(x, w, bits, groups, dtype, layouts):
  x_codes, x_scale = quant.activation_codes(x, bits)
  w_codes, alpha = kernel_codes(w, groups, layouts)
  acc = integer_matmul(x_codes, w_codes)
  y = scale_product(acc, x_scale, alpha, groups, w.ndim - 1,
                    dtype).astype(dtype)
  # residuals: int8 codes of both operands (the weight's as gathered, so the
  # backward gathers nothing) and zero-size arrays carrying the dtypes
  return y, (x_codes, x_scale, w_codes, alpha, jnp.zeros((0,), x.dtype),
             jnp.zeros((0,), w.dtype))


def ste_grads(x_codes, x_scale, w_codes, alpha, groups, dtype, g, x_dtype,
              w_dtype):
  """The STE backward of Q_x(x) . Q_w(W) from the forward's codes:
  (dL/dQ_x(x) in x_dtype, dL/dW in w_dtype)."""
  g = g.astype(dtype)
  # Q_w(W) in `dtype` from its codes: codes in {-1, 0, 1} make this equal,
  # bit for bit, to the fake quantizer's alpha * codes cast to `dtype`
  wq = (w_codes.astype(dtype) *
        quant.spread(alpha, groups, w_codes.ndim).astype(dtype))
  out_axes = tuple(range(1, w_codes.ndim))
  lead = x_codes.ndim - 1
  # dx = g . Q_w(W)^T: contract g's output axes with wq's
  dx = jax.lax.dot_general(
      g, wq, ((tuple(range(lead, g.ndim)), out_axes), ((), ())))
  # dW = Q_x(x)^T . g: the fake-quantized input, rebuilt from its codes
  xq = (x_codes.astype(jnp.float32) * x_scale).astype(x_dtype).astype(dtype)
  tokens = tuple(range(lead))
  dw = jax.lax.dot_general(xq, g, ((tokens, tokens), ((), ())))
  return dx.astype(x_dtype), dw.astype(w_dtype)


def _bwd(bits, groups, dtype, layouts, residuals, g):
  del bits, layouts
  x_codes, x_scale, w_codes, alpha, x_like, w_like = residuals
  return ste_grads(x_codes, x_scale, w_codes, alpha, groups, dtype, g,
                   x_like.dtype, w_like.dtype)


ste_integer_matmul.defvjp(
    lambda x, w, bits, groups, dtype, layouts: _forward(
        x, w, bits, groups, dtype, layouts), _bwd)
