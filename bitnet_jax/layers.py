"""The linear layers: the one place where quantization enters the model.

  RMSNorm     x / rms(x) * scale (float32 arithmetic).
  Linear      float matmul (the `fp` LLaMA baseline and the output head).
  BitLinear   the one linear pipeline of every quantized projection:
                norm -> rotation -> [top-K] -> activation quantizer ->
                weight form -> matmul
              each stage chosen by the layer's fields, which the quantization
              policy (policy.py) sets per site and variant.

Stages: `rotation` (rotations.py: none, the H-BitLinear Hadamard of Eq. 7, its
weight-and-activation ablation, or a post-training QuaRot / SpinQuant
rotation, fused into the kernel or undone after quantization); `quant`, one
small frozen `QuantConfig`: top-K share, activation bits and INT4 scale,
ternary weights, and the weight form: 'latent' float32 kernels (training:
quantized on every call, so the optimizer updates the latent value) or
exported ternary codes ('int8', 'packed') multiplied in integers.

Mean-centred H-BitLinear (`centre`, an option of this project): the rotated
input z = H x of a trained v2 model can hold a token-shared offset (a learned
channel acting as a bias) that INT4 absmean clips; the layer quantizes
z - mu and adds Q_w(W) mu back, exact in float, a bias at inference.

The fused input (`quant.input_kernel`, kernels/h_bitlinear.py): where the
H-BitLinear trains with the integer matmul, norm -> Hadamard -> quantize run
as one Pallas kernel writing int8 codes (Mosaic on TPU); the stages here
stay the reference and the CPU and GPU path.

Kernels are stored [in, *out] and carry logical axis names for sharding.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitnet_jax import hadamard
from bitnet_jax import packing
from bitnet_jax import quant as quantizers
from bitnet_jax import rotations
from bitnet_jax import ternary_matmul
from bitnet_jax.model_config import TRAIN_MATMULS, WEIGHT_FORMS
from bitnet_jax.rotations import ROTATIONS, contract
from bitnet_jax import partitioning
from bitnet_jax.kernels import h_bitlinear, h_input


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
    matmul: how latent weights multiply while training: 'float' (the
      fake-quantized values in the compute dtype) or 'int8' (codes x codes,
      int32 accumulation, straight-through backward: ternary_matmul.py);
      both give the same gradients.
  """
  ternary_weights: bool = True
  act_bits: int | None = 8
  int4_scale: str = "absmean"
  topk_ratio: float | None = None
  hadamard_block_size: int = hadamard.DEFAULT_BLOCK_SIZE
  weights: str = "latent"
  matmul: str = "float"
  input_kernel: str = "jnp"    # H-BitLinear input: jnp stages | a Pallas
                               # kernel (kernels/h_input.IMPLS)

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
    if self.input_kernel not in ("jnp",) + h_input.IMPLS:
      raise ValueError(f"input_kernel must be jnp or one of {h_input.IMPLS}, "
                       f"got {self.input_kernel!r}")
    if self.matmul not in TRAIN_MATMULS:
      raise ValueError(f"matmul must be one of {TRAIN_MATMULS}"
                       f", got {self.matmul!r}")
    if self.matmul == "int8" and (self.act_bits is None or
                                  not self.ternary_weights or
                                  self.int4_scale != "absmean"):
      raise ValueError("the integer training matmul needs ternary weights "
                       "and 8-bit or absmean 4-bit activations")

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


def _as_tuple(features: int | Sequence[int]) -> tuple[int, ...]:
  return (features,) if isinstance(features, int) else tuple(features)


class RMSNorm(nn.Module):
  """Root-mean-square normalisation with a learned per-channel scale."""
  eps: float = 1e-6
  axis_name: str | None = "embed"
  dtype: Any = None  # output dtype; None keeps the input dtype

  @nn.compact
  def __call__(self, x: jax.Array, scale_only: bool = False) -> jax.Array:
    """RMSNorm(x); with scale_only, the learned scale [n] alone (for a
    kernel that applies the norm itself: kernels/h_bitlinear.py)."""
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones,
                                              (self.axis_name,)),
        (x.shape[-1],), jnp.float32)
    if scale_only:
      return scale
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
    return contract(x.astype(self.dtype), w.astype(self.dtype))


class BitLinear(nn.Module):
  """norm -> rotation -> [top-K] -> Q_x -> matmul with Q_w(W) (see above).

  rotation: one of rotations.ROTATIONS; `fused` applies to the post-training
  kinds (False: the rotation is undone after quantizing x, Table 4).
  """
  features: int | Sequence[int]
  kernel_axes: Sequence[str | None]
  quant: QuantConfig = QuantConfig()
  rotation: str = "none"
  fused: bool = True
  scale_groups: tuple | None = None   # quant.ScaleGroups: per-projection alpha
  centre: bool = False   # subtract the offset param mu after the rotation
  use_norm: bool = True
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    self._check()
    weights = self._weights(x.shape[-1])
    if self._fused_input(x):  # norm -> H -> Q_x in one kernel (kernels/)
      cfg = self.quant
      y = h_bitlinear.h_bitlinear(
          x, self._norm(x, scale_only=True), weights, cfg.act_bits,
          self.scale_groups, self.dtype,
          partitioning.matmul_layouts(self.kernel_axes), self.norm_eps,
          cfg.input_kernel)
    else:
      y = self._stages(x, weights)
    return y.astype(self.dtype)

  def _norm(self, x, scale_only=False):
    return RMSNorm(self.norm_eps, self.kernel_axes[0], name="norm")(
        x, scale_only)

  def _fused_input(self, x) -> bool:
    """H-BitLinear whose stages the fused kernel covers: the v2 Hadamard,
    its own norm, the integer matmul, no centring or top-K, and no
    intermediates asked for (analysis and calibration read the stages)."""
    cfg = self.quant
    return (cfg.input_kernel != "jnp" and self.rotation == "activation"
            and self.use_norm and not self.centre and cfg.topk_ratio is None
            and cfg.matmul == "int8" and cfg.weights == "latent"
            and not self.is_mutable_collection("intermediates")
            and h_bitlinear.applies(x.shape[-1], x.shape[0], cfg.input_kernel,
                                    self.kernel_axes[0]))

  def _stages(self, x, weights):
    """norm -> rotation -> [centre] -> [top-K] -> the product by weight form
    (the jnp reference of every variant)."""
    cfg = self.quant
    d_in, block = x.shape[-1], cfg.hadamard_block_size
    # norm
    if self.use_norm:
      x = self._norm(x)
    # rotation
    ptq, rot = self.rotation in rotations.PTQ_KINDS, None
    if self.rotation != "none":
      self.sow("intermediates", "pre_rotation", x)
      if ptq:
        rot = self._ptq_rotation(d_in)
        x = rotations.ptq_rotate(x, self.rotation, rot, block)
      else:
        x = rotations.hadamard_input(x, block, self.kernel_axes[0])
    mu = None
    if self.centre:  # mean-centred H-BitLinear: quantize H x - mu
      mu = self._offset(d_in)
      self.sow("intermediates", "rotated_mean",
               jnp.mean(x.astype(jnp.float32), axis=tuple(range(x.ndim - 1))))
      x = x - mu.astype(x.dtype)
    self.sow("intermediates", "quant_input", x)
    # sparsify
    if cfg.topk_ratio is not None:
      x = quantizers.sparsify_topk(x, cfg.topk_ratio)
    y, bias_weight, dtype = self._product(x, weights, rot, block)
    if mu is not None:  # + Q_w(W) mu: the centring's bias, in each form's dtype
      y = y + contract(mu.astype(dtype), bias_weight().astype(dtype))
    return y

  def _product(self, x, weights, rot, block):
    """The quantized product by weight form: (y, the weight the centring
    bias multiplies, as a thunk, and the dtype of that bias)."""
    cfg, groups = self.quant, self.scale_groups
    if cfg.weights != "latent":  # exported codes: integer matmul, then scales
      w_codes, w_scale = weights
      x_codes, x_scale = quantizers.activation_codes(x, cfg.act_bits)
      y = ternary_matmul.scale_product(
          ternary_matmul.integer_matmul(x_codes, w_codes), x_scale, w_scale,
          groups, w_codes.ndim - 1)
      return y, lambda: w_codes.astype(jnp.float32) * quantizers.spread(
          w_scale, groups, w_codes.ndim), jnp.float32
    w = weights
    if self.rotation == "weight_and_activation":
      w = rotations.rotate_input_axis(w, block)
    if cfg.matmul == "int8":  # integer forward, straight-through backward
      self.sow("intermediates", "quantized_input",
               quantizers.quantize_activations(x, cfg.act_bits))
      y = ternary_matmul.ste_integer_matmul(
          x, w, cfg.act_bits, groups, self.dtype,
          partitioning.matmul_layouts(self.kernel_axes))
      return y, lambda: quantizers.quantize_weights_ternary(w, groups), self.dtype
    # activation quantizer
    x = quantizers.quantize_activations(x, cfg.act_bits, cfg.int4_scale)
    self.sow("intermediates", "quantized_input", x)
    if rot is not None and not self.fused:
      x = rotations.ptq_unrotate(x, self.rotation, rot, block)
    # weight form
    if cfg.ternary_weights:
      w = quantizers.quantize_weights_ternary(w, groups)
    return contract(x.astype(self.dtype), w.astype(self.dtype)), (
        lambda: w), self.dtype

  def _check(self):
    if self.rotation not in ROTATIONS:
      raise ValueError(f"{self.name}: rotation must be one of {ROTATIONS}, "
                       f"got {self.rotation!r}")
    if self.quant.weights != "latent" and self.rotation in rotations.PTQ_KINDS:
      raise ValueError(f"{self.name}: rotated baselines run on latent weights")

  def _weights(self, d_in: int):
    """The latent kernel [in, *out], or (ternary codes, scale) of exported
    weights (their codes already include any weight rotation)."""
    shape = (d_in, *_as_tuple(self.features))
    if self.quant.weights == "latent":
      return _kernel(self, d_in, shape[1:], self.kernel_axes, self.kernel_init,
                     self.param_dtype)
    groups = self.scale_groups
    scale = self.param("scale", nn.initializers.ones,
                       () if groups is None else (max(groups[1]) + 1,),
                       jnp.float32)
    if self.quant.weights == "packed":
      packed = self.param("packed", nn.initializers.zeros,
                          (packing.packed_ternary_size(shape),), jnp.uint8)
      return packing.unpack_ternary(packed, shape), scale
    return self.param("codes", nn.initializers.zeros, shape, jnp.int8), scale

  def _offset(self, d_in: int) -> jax.Array:
    """mu [in]: the token-shared offset of the rotated input, set by
    calibration (training/centring.py), never by the optimizer: with a
    straight-through Q_x, Q_x(z - mu) W + mu W has zero gradient in mu."""
    mu = self.param("offset", nn.with_logical_partitioning(
        nn.initializers.zeros, (self.kernel_axes[0],)), (d_in,), jnp.float32)
    return jax.lax.stop_gradient(mu)

  def _ptq_rotation(self, d_in: int) -> jax.Array:
    if self.rotation == "random_hadamard":
      return self.param("signs", nn.initializers.ones, (d_in,), jnp.float32)
    return self.param("rotation", lambda _, n: jnp.eye(n, dtype=jnp.float32),
                      d_in)
