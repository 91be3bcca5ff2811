"""The model's typed config: the `model` and `quant` config groups, as is.

`ModelConfig` has one field per key of `config.model` and per model-side key
of `config.quant` (everything but the training loop's `a4_start_step`), with
the same names, defaults and encodings (0 / "none" / "" mean off or default):
`ModelConfig.from_config(config)` copies the two groups without renaming
anything, and `__post_init__` is the one place the model's fields are
validated. defaults.py documents every field; a test checks the two agree.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from bitnet_jax import hadamard as hadamard_lib
from bitnet_jax.kernels import splash
from bitnet_jax.errors import ConfigError

VARIANTS = ("fp", "b1.58", "v2", "a4.8")
HADAMARD = ("none", "activation", "weight_and_activation")
PTQ_ROTATIONS = ("none", "random_hadamard", "learned")
WEIGHT_FORMS = ("latent", "int8", "packed")
TRAIN_MATMULS = ("float", "int8")   # how latent weights multiply in training
# quant.train_matmul='auto' by backend, from measurements (docs/scale.md, "Integer
# matmuls in training"): int8 on TPU (compiled estimate), CPU (bench) and
# GPU (compiled estimate, docs/gpu_fit_table.md: with the fused H-BitLinear
# input kernel the H100 steps are estimated 29-39% faster than with float
# matmuls, and even with the jnp stages int8 is the faster at every size),
# until a GPU measures otherwise (python -m bitnet_jax.scale.gpu_measure)
AUTO_TRAIN_MATMUL = {"tpu": "int8", "cpu": "int8", "gpu": "int8"}
WEIGHT_SCALES = ("projection", "tensor")
# quant.input_kernel: the H-BitLinear input as jnp stages or one Pallas
# kernel (kernels/h_input.py); '' resolves by backend (for_platform)
INPUT_KERNELS = ("", "jnp", "mosaic", "interpret", "triton", "triton_interpret")
AUTO_INPUT_KERNEL = {"tpu": "mosaic", "gpu": "triton"}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# cuDNN's fused (flash) attention, as jax 0.10.2 calls it: bf16 / fp16
# operands, head dims that are multiples of 8 up to 128.
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128
ATTENTION_IMPLS = ("", "xla", "cudnn", "splash", "splash_interpret")
# Keys of config.quant that belong to the training loop, not the model.
TRAINING_QUANT_KEYS = ("a4_start_step",)


def cudnn_attention_refusal(cfg: "ModelConfig") -> str:
  """Why cuDNN's fused attention cannot run this model ('' if it can)."""
  if cfg.dtype not in CUDNN_DTYPES:
    return (f"model.dtype={cfg.dtype} (cuDNN attention takes "
            f"{' / '.join(CUDNN_DTYPES)})")
  if cfg.head_dim % 8 or cfg.head_dim > CUDNN_MAX_HEAD_DIM:
    return (f"head dim {cfg.head_dim} (cuDNN attention takes multiples of 8 "
            f"up to {CUDNN_MAX_HEAD_DIM})")
  return ""


_REPORTED_FALLBACKS: set = set()


def attention_for(cfg: "ModelConfig", platform: str) -> str:
  """attention_impl='' by backend: cuDNN's fused attention on GPU and the
  Pallas splash kernel on TPU where they apply (no [B, H, T, T] scores in
  memory), XLA's elsewhere; a GPU model that cuDNN cannot run falls back to
  XLA, said once per reason."""
  if platform == "tpu":
    return "splash" if splash.applies(cfg.seq_len) else "xla"
  if platform != "gpu":
    return "xla"
  why = cudnn_attention_refusal(cfg)
  if not why:
    return "cudnn"
  if why not in _REPORTED_FALLBACKS:
    _REPORTED_FALLBACKS.add(why)
    logging.getLogger(__name__).warning(
        "attention on GPU: XLA's (the scores are materialised), not cuDNN's: "
        "%s; set model.attention_impl to choose", why)
  return "xla"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that decides the model's function and shapes."""
  # config.model
  vocab_size: int
  d_model: int
  d_ff: int
  num_heads: int
  num_layers: int
  seq_len: int
  variant: str = "v2"
  num_kv_heads: int = 0               # 0: multi-head (= num_heads)
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = "float32"              # compute dtype; latent weights are f32
  scan_layers: bool = True
  remat: str = "none"
  tie_embeddings: bool = False
  attention_impl: str = ""            # "" (by backend), 'xla', 'cudnn',
                                      # 'splash' (TPU), 'splash_interpret'
  attention_block: int = 0            # splash block along the sequence; 0: 512
  activation: str = ""                # GLU: "" (the variant's), swiglu, relu2
  # config.quant
  act_bits: int = 8
  hadamard: str = "activation"
  hadamard_block_size: int = hadamard_lib.DEFAULT_BLOCK_SIZE
  topk_ratio_o: float = 0.5           # a4.8 at 4 bits: W_o input top-K share
  topk_ratio_down: float = 0.0        # a4.8 at 4 bits: W_down input top-K; 0 off
  q_bits: int = 0                     # post-RoPE query bits (Tables 2-3); 0 off
  kv_bits: int = 0                    # post-RoPE key/value bits; 0 off
  ptq_rotation: str = "none"          # b1.58 PTQ: random_hadamard | learned
  ptq_fused: bool = True              # PTQ: rotation fused into W_qkv, W_up,gate
  weight_scale: str = "projection"    # absmean per projection | per tensor
  weights: str = "latent"             # 'int8' / 'packed': exported inference
  quantized: bool = True              # False: float weights and activations
  train_matmul: str = "auto"          # 'int8': integer forward while training
  mean_centre: bool = False           # v2: centred H-BitLinear (offset mu)
  input_kernel: str = ""              # "" (by backend), jnp, mosaic, triton,
                                      # [triton_]interpret (kernels/h_input.py)

  def __post_init__(self):
    def bad(field, msg):
      raise ConfigError(f"model.{field}: {msg}")

    def one_of(field, allowed):
      if getattr(self, field) not in allowed:
        bad(field, f"must be one of {tuple(allowed)}, got "
            f"{getattr(self, field)!r}")

    def hadamard_size(field, why):
      try:
        hadamard_lib.check_size(getattr(self, field))
      except ValueError as e:
        bad(field, f"{why}: {e}")

    one_of("variant", VARIANTS)
    one_of("act_bits", (8, 4))
    one_of("hadamard", HADAMARD)
    one_of("weights", WEIGHT_FORMS)
    one_of("ptq_rotation", PTQ_ROTATIONS)
    one_of("remat", REMAT_POLICIES)
    one_of("dtype", DTYPES)
    one_of("attention_impl", ATTENTION_IMPLS)
    if self.attention_impl.startswith("splash") and not splash.applies(
        self.seq_len):
      bad("attention_impl", f"splash attention needs seq_len a multiple of "
          f"{splash.LANES}, got {self.seq_len}")
    if self.attention_block < 0 or self.attention_block % splash.LANES:
      bad("attention_block", f"must be 0 (by chip) or a multiple of "
          f"{splash.LANES}, got {self.attention_block}")
    one_of("weight_scale", WEIGHT_SCALES)
    one_of("activation", ("", "swiglu", "relu2"))
    one_of("train_matmul", ("auto",) + TRAIN_MATMULS)
    one_of("input_kernel", INPUT_KERNELS)
    for field in ("q_bits", "kv_bits"):
      bits = getattr(self, field)
      if bits and not 2 <= bits <= 8:
        bad(field, f"must be in [2, 8] or 0 (off), got {bits}")
    for field in ("topk_ratio_o", "topk_ratio_down"):
      if not 0 <= getattr(self, field) <= 1:
        bad(field, f"must be in (0, 1] or 0 (off), got {getattr(self, field)}")
    if self.weights != "latent" and self.variant == "fp":
      bad("weights", "the fp baseline has no ternary weights to export")
    if self.ptq_rotation != "none":
      if self.variant != "b1.58":
        bad("ptq_rotation", "the rotation baselines quantize a b1.58 model")
      if self.weights != "latent":
        bad("weights", "the rotation baselines run on latent weights")
      if self.ptq_rotation == "random_hadamard":
        hadamard_size("d_model", "a random Hadamard rotation needs a Hadamard size")
        hadamard_size("d_ff", "a random Hadamard rotation needs a Hadamard size")
    for field in ("vocab_size", "d_model", "d_ff", "num_heads", "num_layers",
                  "seq_len"):
      if getattr(self, field) <= 0:
        bad(field, f"must be positive, got {getattr(self, field)}")
    if self.num_kv_heads < 0:
      bad("num_kv_heads", f"must be >= 0 (0: num_heads), got {self.num_kv_heads}")
    if self.d_model % self.num_heads:
      bad("num_heads", f"{self.num_heads} does not divide d_model {self.d_model}")
    if self.num_heads % self.kv_heads:
      bad("num_kv_heads", f"{self.kv_heads} does not divide num_heads "
          f"{self.num_heads}")
    if self.head_dim % 2:
      bad("num_heads", f"head dim {self.head_dim} must be even for RoPE")
    if self.mean_centre and (self.variant != "v2" or self.hadamard == "none"
                             or self.ptq_rotation != "none"):
      bad("mean_centre", "centres the H-BitLinear input: needs variant v2 "
          "with a Hadamard rotation")
    if self.variant == "v2" and self.hadamard != "none":
      hadamard_size("d_model", "the H-BitLinear input width is not a Hadamard size")
      hadamard_size("d_ff", "the H-BitLinear input width is not a Hadamard size")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def for_platform(self, platform: str) -> "ModelConfig":
    """train_matmul='auto', attention_impl='' and input_kernel='' resolved
    for a backend ('cpu', 'tpu', 'gpu')."""
    changes = {}
    if self.train_matmul == "auto":
      changes["train_matmul"] = AUTO_TRAIN_MATMUL.get(platform, "float")
    if not self.attention_impl:
      changes["attention_impl"] = attention_for(self, platform)
    if not self.input_kernel:
      changes["input_kernel"] = AUTO_INPUT_KERNEL.get(platform, "jnp")
    return self.replace(**changes) if changes else self

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_config(cls, config) -> "ModelConfig":
    """From a full config: every key of `model`, and `quant` but the training
    loop's keys, by the same name."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(config.model.items())
    values.update((k, v) for k, v in config.quant.items()
                  if k not in TRAINING_QUANT_KEYS)
    unknown = sorted(set(values) - names)
    if unknown:
      raise ConfigError(f"unknown model/quant config fields {unknown}; the "
                        "fields are listed in bitnet_jax/defaults.py")
    return cls(**values)
