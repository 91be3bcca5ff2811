"""The quantization policy: what each site of the model does, for every
variant and ablation. The model asks here and never branches on the variant.

  site        fp      b1.58    v2                 a4.8 (act_bits 8 | 4)
  W_qkv       float   Q_x(x)   Q_x(x)             8-bit | 4-bit
  W_o         float   Q_x(x)   Q_x(H x)           8-bit | top-K -> 8-bit
  W_up,gate   float   Q_x(x)   Q_x(x)             8-bit | 4-bit
  W_down      float   Q_x(x)   Q_x(H x)           8-bit | [top-K] -> 8-bit
  Q, K/V      post-RoPE absmax at q_bits / kv_bits (off by default; BOS K/V
              keep 8 bits); the same for every variant
  GLU         SwiGLU; squared ReLU for a4.8 (model.activation overrides,
              for matched comparisons)
  block norms pre-norms for fp; the BitLinear layers norm their own inputs
  centring    v2 with quant.mean_centre: W_o, W_down quantize H x - mu and add
              Q_w(W) mu back (mu: a calibrated per-channel offset)

Q_x is the INT8 (Eq. 5) or INT4 absmean (Eq. 6) quantizer of `act_bits`; all
quantized weights are ternary absmean (Eq. 1-2). `hadamard` selects the v2
rotation ablation (Table 5); `ptq_rotation` turns a b1.58 model into a
post-training rotation baseline (Table 4: absmax INT4 activations, rotation
R at every input, fused into W_o / W_down and optionally into the others);
`quantized=False` is the float reference (same rotations, no quantizers);
`weights` is the exported integer form; `train_matmul='int8'` multiplies
latent weights as integer codes (ternary_matmul.py), same gradients.
"""
from __future__ import annotations

import dataclasses

import jax

from bitnet_jax import sites
from bitnet_jax.layers import QuantConfig
from bitnet_jax.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LinearPolicy:
  """How one projection computes. quant None: a float Linear."""
  quant: QuantConfig | None
  rotation: str = "none"
  fused: bool = True
  scale_groups: tuple | None = None   # quant.ScaleGroups of a fused kernel
  centre: bool = False                # subtract the offset mu before Q_x


def linear(cfg: ModelConfig, role: str) -> LinearPolicy:
  """The policy of projection `role` (a sites.Site name)."""
  site = sites.BY_NAME[role]
  if cfg.variant == "fp":
    return LinearPolicy(quant=None)
  block = cfg.hadamard_block_size
  if cfg.ptq_rotation != "none":
    quant = (QuantConfig(act_bits=cfg.act_bits, int4_scale="absmax",
                         hadamard_block_size=block) if cfg.quantized else
             QuantConfig.off())
    # Table 4: only W_qkv and W_up,gate may give up the fusion.
    return LinearPolicy(quant, cfg.ptq_rotation,
                        fused=cfg.ptq_fused or site.intermediate,
                        scale_groups=scale_groups(cfg, role))
  rotation = hadamard_rotation(cfg, role)
  if not cfg.quantized:
    return LinearPolicy(QuantConfig.off(), rotation,
                        scale_groups=scale_groups(cfg, role))
  bits, topk = cfg.act_bits, None
  if cfg.variant == "a4.8" and cfg.act_bits == 4 and site.intermediate:
    # sparsified 8-bit intermediate states
    bits = 8
    topk = (cfg.topk_ratio_o if role == "o" else cfg.topk_ratio_down) or None
  return LinearPolicy(QuantConfig(act_bits=bits, topk_ratio=topk,
                                  hadamard_block_size=block,
                                  weights=cfg.weights,
                                  matmul=train_matmul(cfg),
                                  input_kernel=input_kernel(cfg)),
                      rotation,
                      scale_groups=scale_groups(cfg, role),
                      centre=cfg.mean_centre and rotation != "none")


def attention_impl(cfg: ModelConfig) -> str:
  """The attention implementation: model.attention_impl, or '' resolved for
  this process's backend (ModelConfig.for_platform resolves it for the
  devices a run is built for)."""
  return cfg.attention_impl or cfg.for_platform(
      jax.default_backend()).attention_impl


def train_matmul(cfg: ModelConfig) -> str:
  """How latent weights multiply: 'float' or 'int8' (exported weights always
  multiply as integers; 'auto' resolves for this process's backend, or for
  the devices a run is built for: ModelConfig.for_platform)."""
  if cfg.weights != "latent":
    return "float"
  return cfg.for_platform(jax.default_backend()).train_matmul


def input_kernel(cfg: ModelConfig) -> str:
  """The H-BitLinear input's implementation: quant.input_kernel, or ''
  resolved for this process's backend (as train_matmul)."""
  return cfg.input_kernel or cfg.for_platform(
      jax.default_backend()).input_kernel


def scale_groups(cfg: ModelConfig, role: str):
  """The projections fused in a kernel, each with its own absmean scale (as
  BitNet b1.58 quantizes W_q, W_k, W_v, W_up, W_gate): quant.ScaleGroups on
  the kernel layouts of model.py (W_qkv [D, K, G + 2, E]: G query slots, then
  K and V; W_up,gate [D, 2, F]); None for a single projection or with
  weight_scale='tensor'."""
  if cfg.weight_scale == "tensor":
    return None
  if role == sites.QKV.name:
    return (2, (0,) * (cfg.num_heads // cfg.kv_heads) + (1, 2))
  if role == sites.UP_GATE.name:
    return (1, (0, 1))
  return None


def hadamard_rotation(cfg: ModelConfig, role: str) -> str:
  """The H-BitLinear rotation of a projection: W_o and W_down of v2."""
  if cfg.variant == "v2" and sites.BY_NAME[role].intermediate:
    return cfg.hadamard
  return "none"


def query_bits(cfg: ModelConfig) -> int | None:
  """Bits of the post-RoPE queries (Tables 2-3); None: float."""
  return cfg.q_bits or None


def kv_bits(cfg: ModelConfig) -> int | None:
  """Bits of the post-RoPE keys and values (and the KV cache); None: float."""
  return cfg.kv_bits or None


def glu_activation(cfg: ModelConfig) -> str:
  """model.activation, or the variant's own: 'relu2' (squared ReLU) for
  BitNet a4.8, 'swiglu' for the others."""
  return cfg.activation or ("relu2" if cfg.variant == "a4.8" else "swiglu")


def block_pre_norms(cfg: ModelConfig) -> bool:
  """Pre-norms in each block: only the float baseline (a BitLinear normalises
  its own input)."""
  return cfg.variant == "fp"
