"""Linear layers: the one place where quantization enters the model.

  RMSNorm     x / rms(x) * scale (float32 arithmetic).
  Linear      float matmul (the `fp` LLaMA baseline).
  BitLinear   its own RMSNorm -> [top-K] -> activation quantization (8 / 4 /
              none) -> ternary weights -> matmul (BitNet b1.58).
  HBitLinear  RMSNorm -> fwht -> quantization -> ternary matmul (Eq. 7).

What a layer quantizes is one small frozen `QuantConfig`. Where it rotates is
the layer's `rotation` flag: 'none', 'activation' (H-BitLinear: Y =
Q_w(W) Q_x(H x), the paper's choice) or 'weight_and_activation' (the Table 5
ablation: Y = Q_w(H W) Q_x(H x), so that without quantization the rotations
cancel and the layer computes W x).

Kernels are stored [in, *out] in float32 (the latent weights of Sec. 2.2) and
carry logical axis names for sharding; they are quantized (and cast to the
compute dtype) on every call, so the optimizer always updates the latent value.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitnet_jax import hadamard
from bitnet_jax import quant as quantizers
from bitnet_jax import sharding

ROTATIONS = ("none", "activation", "weight_and_activation")
WEIGHT_FORMS = ("latent", "int8", "packed")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How one linear layer quantizes its operands.

  Attributes:
    ternary_weights: absmean ternary weights (Eq. 1-2); False keeps them float.
    act_bits: 8 (Eq. 5), 4 (Eq. 6) or None (float activations).
    int4_scale: 'absmean' (Eq. 6, BitNet v2) or 'absmax' (the 4-bit
      activations of the post-training rotation baselines, Sec. 3.2).
    topk_ratio: keep this share of each token's largest entries before the
      activation quantizer (BitNet a4.8's sparsified intermediate states).
    hadamard_block_size: block size handed to `fwht` by rotating layers.
    weights: 'latent' (float kernels quantized on every call: training), or
      for inference on exported weights, 'int8' (ternary codes held as int8)
      or 'packed' (2-bit codes, four per byte, unpacked on every call); both
      multiply integer activation codes by the ternary codes with int32
      accumulation and apply the two scales afterwards.
  """
  ternary_weights: bool = True
  act_bits: int | None = 8
  int4_scale: str = "absmean"
  topk_ratio: float | None = None
  hadamard_block_size: int = hadamard.DEFAULT_BLOCK_SIZE
  weights: str = "latent"

  def __post_init__(self):
    if self.act_bits not in (8, 4, None):
      raise ValueError(f"act_bits must be 8, 4 or None, got {self.act_bits!r}")
    if self.int4_scale not in quantizers.INT4_SCALES:
      raise ValueError(f"int4_scale must be one of {quantizers.INT4_SCALES}, "
                       f"got {self.int4_scale!r}")
    if self.weights != "latent" and self.int4_scale != "absmean":
      raise ValueError("integer weights support the absmean INT4 of Eq. 6 only")
    if self.weights not in WEIGHT_FORMS:
      raise ValueError(f"weights must be one of {WEIGHT_FORMS}, got "
                       f"{self.weights!r}")
    if self.weights != "latent" and (self.act_bits is None or
                                     not self.ternary_weights):
      raise ValueError("integer weights need ternary weights and 8 or 4 "
                       "activation bits")
    if self.topk_ratio is not None:
      quantizers.topk_count(1, self.topk_ratio)  # validates the range

  @classmethod
  def off(cls) -> "QuantConfig":
    return cls(ternary_weights=False, act_bits=None)


def _kernel(module: nn.Module, in_dim: int, features: Sequence[int],
            axes: Sequence[str | None], init, param_dtype) -> jax.Array:
  if len(axes) != 1 + len(features):
    raise ValueError(f"{module.name}: kernel_axes {tuple(axes)} must name the "
                     f"input axis and {len(features)} output axes")
  return module.param("kernel", nn.with_logical_partitioning(init, tuple(axes)),
                      (in_dim, *features), param_dtype)


def _contract(x: jax.Array, w: jax.Array) -> jax.Array:
  """x[..., in] . w[in, *out] -> [..., *out]."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _as_tuple(features: int | Sequence[int]) -> tuple[int, ...]:
  return (features,) if isinstance(features, int) else tuple(features)


def integer_matmul(x_codes: jax.Array, w_codes: jax.Array) -> jax.Array:
  """int8 activation codes [..., in] . int8 ternary codes [in, *out], exact
  int32 accumulation."""
  return jax.lax.dot_general(x_codes, w_codes,
                             (((x_codes.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.int32)


def rotate_input_axis(w: jax.Array, block_size: int) -> jax.Array:
  """Apply the orthonormal Hadamard along the input axis (axis 0) of w[in, *out]."""
  flat = w.reshape(w.shape[0], -1)
  return hadamard.fwht(flat.T, block_size).T.reshape(w.shape)


def rotate(x: jax.Array, block_size: int, logical_axis: str | None) -> jax.Array:
  """The layer-input Hadamard. When tensor parallelism splits the feature
  axis (the W_o / W_down inputs: heads, mlp), the distributed FWHT: local
  butterflies and one cross-shard stage instead of gathering the activation."""
  split = sharding.feature_split(logical_axis, x.shape[0]) if x.ndim > 1 else None
  if split and hadamard.shardable(x.shape[-1], split[1]):
    axis, shards, batch_axes = split
    return hadamard.fwht_sharded(x, axis, shards, block_size, batch_axes)
  return hadamard.fwht(x, block_size)


class RMSNorm(nn.Module):
  """Root-mean-square normalisation with a learned per-channel scale."""
  eps: float = 1e-6
  axis_name: str | None = "embed"
  dtype: Any = None  # output dtype; None keeps the input dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones,
                                              (self.axis_name,)),
        (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                            + self.eps) * scale
    return y.astype(self.dtype or x.dtype)


class Linear(nn.Module):
  """Float linear layer without bias (LLaMA baseline)."""
  features: int | Sequence[int]
  kernel_axes: Sequence[str | None]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = _kernel(self, x.shape[-1], _as_tuple(self.features), self.kernel_axes,
                self.kernel_init, self.param_dtype)
    self.sow("intermediates", "quant_input", x)  # for analysis, as BitLinear's
    return _contract(x.astype(self.dtype), w.astype(self.dtype))


class BitLinear(nn.Module):
  """RMSNorm -> [Hadamard] -> [top-K] -> Q_act -> matmul with Q_w(W)."""
  features: int | Sequence[int]
  kernel_axes: Sequence[str | None]
  quant: QuantConfig = QuantConfig()
  rotation: str = "none"
  use_norm: bool = True
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(stddev=0.02)

  def _check_rotation(self):
    if self.rotation not in ROTATIONS:
      raise ValueError(f"{self.name}: rotation must be one of {ROTATIONS}, "
                       f"got {self.rotation!r}")

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    self._check_rotation()
    cfg = self.quant
    if cfg.weights != "latent":
      return self._integer(x)
    w = _kernel(self, x.shape[-1], _as_tuple(self.features), self.kernel_axes,
                self.kernel_init, self.param_dtype)
    if self.use_norm:
      x = RMSNorm(self.norm_eps, self.kernel_axes[0], name="norm")(x)
    if self.rotation != "none":
      self.sow("intermediates", "pre_rotation", x)
      x = rotate(x, cfg.hadamard_block_size, self.kernel_axes[0])
    self.sow("intermediates", "quant_input", x)
    if cfg.topk_ratio is not None:
      x = quantizers.sparsify_topk(x, cfg.topk_ratio)
    x = quantizers.quantize_activations(x, cfg.act_bits, cfg.int4_scale)
    self.sow("intermediates", "quantized_input", x)
    if self.rotation == "weight_and_activation":
      w = rotate_input_axis(w, cfg.hadamard_block_size)
    if cfg.ternary_weights:
      w = quantizers.quantize_weights_ternary(w)
    return _contract(x.astype(self.dtype), w.astype(self.dtype))


  def _integer(self, x: jax.Array) -> jax.Array:
    """Inference on exported ternary codes (see `bitnet_jax.export`): the
    codes already include a weight rotation, so only x is rotated here."""
    cfg = self.quant
    shape = (x.shape[-1], *_as_tuple(self.features))
    scale = self.param("scale", nn.initializers.ones, (), jnp.float32)
    if cfg.weights == "packed":
      from bitnet_jax import packing
      packed = self.param("packed", nn.initializers.zeros,
                          (packing.packed_ternary_size(shape),), jnp.uint8)
      w_codes = packing.unpack_ternary(packed, shape)
    else:
      w_codes = self.param("codes", nn.initializers.zeros, shape, jnp.int8)
    if self.use_norm:
      x = RMSNorm(self.norm_eps, self.kernel_axes[0], name="norm")(x)
    if self.rotation != "none":
      x = rotate(x, cfg.hadamard_block_size, self.kernel_axes[0])
    if cfg.topk_ratio is not None:
      x = quantizers.sparsify_topk(x, cfg.topk_ratio)
    x_codes, x_scale = quantizers.activation_codes(x, cfg.act_bits)
    acc = integer_matmul(x_codes, w_codes)
    x_scale = x_scale.reshape(*x_scale.shape[:-1], *([1] * (acc.ndim - x_scale.ndim + 1)))
    return (acc.astype(jnp.float32) * (x_scale * scale)).astype(self.dtype)


class HBitLinear(BitLinear):
  """H-BitLinear (Eq. 7): a BitLinear that rotates its input by a Hadamard."""
  rotation: str = "activation"

  def _check_rotation(self):
    super()._check_rotation()
    if self.rotation == "none":
      raise ValueError(f"{self.name}: HBitLinear needs rotation 'activation' or "
                       "'weight_and_activation'; use BitLinear for none")
