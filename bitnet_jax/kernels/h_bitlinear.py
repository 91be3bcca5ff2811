"""H-BitLinear with the fused input kernel (h_input.py) and the integer
matmul: RMSNorm -> Hadamard -> quantize happen in one kernel that writes
int8 codes, which the matmul consumes (the rotated activation never goes
to memory in the compute dtype); one custom VJP holds the paper's STE:

  forward   codes, s_x = h_input(x);  y = (codes . Q_w(W)) s_x alpha
  backward  dq = g . Q_w(W)^T, dW = Q_x^T . g  (ternary_matmul.ste_grads)
            dx, d(norm scale) = h_input's backward of dq (Eq. 8, RMSNorm)

Under a mesh the kernel runs per batch shard (shard_map over the mesh axes
that split the tokens; the norm scale's gradient is summed over them): a
Pallas call is opaque to the partitioner, which would otherwise gather the
activation. `applies` says when the fused path can run (else the layer
takes the jnp stages, which remain the reference).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from bitnet_jax import partitioning, ternary_matmul
from bitnet_jax.kernels import h_input


def applies(n: int, batch: int, impl: str, logical_axis: str | None) -> bool:
  """The kernel supports width n under impl, and the mesh in context (if
  any) splits the tokens only (not the features) evenly."""
  if impl not in h_input.IMPLS or not h_input.supported(n, impl):
    return False
  return partitioning.feature_split(logical_axis, batch) is None and (
      partitioning.token_axes(batch) is not False)


def _per_shard(fn, axes, in_specs, out_specs):
  """fn under shard_map over the token axes ("tokens": split, "whole":
  replicated), or fn itself when nothing splits the tokens."""
  if not axes:
    return fn
  spec = {"tokens": P(axes), "whole": P()}
  # check_vma=False: a pallas_call's outputs carry no varying-axes type
  return jax.shard_map(fn, in_specs=tuple(spec[s] for s in in_specs),
                       out_specs=tuple(spec[s] for s in out_specs),
                       check_vma=False)


def _codes(x, norm_scale, bits, eps, impl):
  n = x.shape[-1]

  def local(x_local, s):
    rows = x_local.reshape(-1, n)
    codes, scales = h_input.quantized_input(rows, s, bits=bits, eps=eps,
                                            impl=impl)
    return (codes.reshape(*x_local.shape),
            scales.reshape(*x_local.shape[:-1], 1))
  fn = _per_shard(local, partitioning.token_axes(x.shape[0]),
                  ("tokens", "whole"), ("tokens", "tokens"))
  return fn(x, norm_scale)


def _input_grads(x, norm_scale, dq, eps, impl):
  n = x.shape[-1]
  axes = partitioning.token_axes(x.shape[0])

  def local(x_local, s, dq_local):
    dx, ds = h_input.input_grads(x_local.reshape(-1, n), s,
                                 dq_local.reshape(-1, n), eps=eps, impl=impl)
    if axes:
      ds = jax.lax.psum(ds, axes)
    return dx.reshape(x_local.shape), ds
  fn = _per_shard(local, axes, ("tokens", "whole", "tokens"),
                  ("tokens", "whole"))
  return fn(x, norm_scale, dq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def h_bitlinear(x: jax.Array, norm_scale: jax.Array, w: jax.Array, bits: int,
                groups, dtype, layouts, eps: float, impl: str) -> jax.Array:
  """RMSNorm(x; norm_scale) -> H -> Q_x (bits) -> . Q_w(w), in `dtype`.

  x [batch, ..., n] (the layer input, before its norm), norm_scale [n],
  w [n, *out] the latent kernel; groups, layouts as ste_integer_matmul's."""
  return _forward(x, norm_scale, w, bits, groups, dtype, layouts, eps, impl)[0]


def _forward(x, norm_scale, w, bits, groups, dtype, layouts, eps, impl):
  codes, scales = _codes(x, norm_scale, bits, eps, impl)
  w_codes, alpha = ternary_matmul.kernel_codes(w, groups, layouts)
  acc = ternary_matmul.integer_matmul(codes, w_codes)
  y = ternary_matmul.scale_product(acc, scales, alpha, groups,
                                   w.ndim - 1, dtype).astype(dtype)
  return y, (x, norm_scale, codes, scales, w_codes, alpha,
             jnp.zeros((0,), w.dtype))


def _backward(bits, groups, dtype, layouts, eps, impl, residuals, g):
  del bits, layouts
  x, norm_scale, codes, scales, w_codes, alpha, w_like = residuals
  dq, dw = ternary_matmul.ste_grads(codes, scales, w_codes, alpha, groups,
                                    dtype, g, x.dtype, w_like.dtype)
  dx, ds = _input_grads(x, norm_scale, dq, eps, impl)
  return dx, ds.astype(norm_scale.dtype), dw


h_bitlinear.defvjp(_forward, _backward)
