"""The projection of the post-training rotation baselines (QuaRot, SpinQuant).

A BitNet b1.58 projection quantized after training with an online rotation R
(orthogonal, [in, in]) of its input, in row-vector form x -> x R (Sec. 3.2):
the layer's own RMSNorm keeps its scale (not fused), the rotated input is
quantized per token (absmax INT4 in the paper's setup), and the weights are
absmean ternary. Two forms (Table 4):

  fused     y = Q_x(x R) . Q_w(R^T W)      the kernel stored is R^T W
  unfused   y = Q_x(x R) R^T . Q_w(W)      = Q_x(x R) . (R Q_w(W)^T)^T: a
                                            float (W16A4) weight in effect

Without quantization both equal x W exactly: R R^T = I.

R is either a random Hadamard, R = diag(s) H with s in {-1, 1} (QuaRot; the
layer holds `signs` [in] and applies `fwht`), or a dense learned matrix
(SpinQuant; the layer holds `rotation` [in, in]).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitnet_jax import hadamard
from bitnet_jax import quant as quantizers
from bitnet_jax.layers import QuantConfig, RMSNorm, _as_tuple, _contract, _kernel

KINDS = ("random_hadamard", "learned")


def random_signs(key: jax.Array, n: int) -> jax.Array:
  """A random diagonal of +-1 (float32)."""
  return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0)


def hadamard_matrix(signs: jax.Array, block_size: int) -> jax.Array:
  """The dense R = diag(signs) H of a random Hadamard rotation."""
  return hadamard.fwht(jnp.diag(signs.astype(jnp.float32)), block_size)


def rotate(x: jax.Array, kind: str, rot: jax.Array, block_size: int):
  """x R along the last axis (rot: signs for random_hadamard, R for learned)."""
  if kind == "random_hadamard":
    return hadamard.fwht(x * rot.astype(x.dtype), block_size)
  return _contract(x, rot.astype(x.dtype))


def unrotate(x: jax.Array, kind: str, rot: jax.Array, block_size: int):
  """x R^T along the last axis."""
  if kind == "random_hadamard":
    return hadamard.fwht(x, block_size) * rot.astype(x.dtype)
  return _contract(x, rot.T.astype(x.dtype))


def fuse_kernel(w: jax.Array, kind: str, rot: jax.Array, block_size: int):
  """R^T W for a kernel w [in, *out] (float32): (R^T W)^T = W^T R."""
  flat = w.reshape(w.shape[0], -1)
  return rotate(flat.T, kind, rot, block_size).T.reshape(w.shape)


class RotatedBitLinear(nn.Module):
  """RMSNorm -> x R -> Q_x -> [R^T] -> matmul with Q_w(kernel)."""
  features: int | Sequence[int]
  kernel_axes: Sequence[str | None]
  kind: str = "random_hadamard"
  fused: bool = True
  quant: QuantConfig = QuantConfig(act_bits=4, int4_scale="absmax")
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind not in KINDS:
      raise ValueError(f"{self.name}: kind must be one of {KINDS}, got "
                       f"{self.kind!r}")
    cfg = self.quant
    if cfg.weights != "latent":
      raise ValueError(f"{self.name}: rotated baselines run on latent weights")
    d_in = x.shape[-1]
    w = _kernel(self, d_in, _as_tuple(self.features), self.kernel_axes,
                self.kernel_init, self.param_dtype)
    if self.kind == "random_hadamard":
      rot = self.param("signs", nn.initializers.ones, (d_in,), jnp.float32)
    else:
      rot = self.param("rotation", lambda _, n: jnp.eye(n, dtype=jnp.float32),
                       d_in)
    x = RMSNorm(self.norm_eps, self.kernel_axes[0], name="norm")(x)
    self.sow("intermediates", "pre_rotation", x)
    block = cfg.hadamard_block_size
    x = rotate(x, self.kind, rot, block)
    self.sow("intermediates", "quant_input", x)
    x = quantizers.quantize_activations(x, cfg.act_bits, cfg.int4_scale)
    self.sow("intermediates", "quantized_input", x)
    if not self.fused:
      x = unrotate(x, self.kind, rot, block)
    if cfg.ternary_weights:
      w = quantizers.quantize_weights_ternary(w)
    return _contract(x.astype(self.dtype), w.astype(self.dtype))
