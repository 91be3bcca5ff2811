"""LLaMA-like decoder (RoPE, causal attention, GLU FFN, no biases) and its variants.

Variants (chosen by ModelConfig.variant, never by copies of the model):
  fp      LLaMA baseline: block pre-norms, float Linear layers, SwiGLU.
  b1.58   BitLinear in every attention/FFN projection; block pre-norms removed
          (each BitLinear normalises its own input).
  v2      as b1.58 but H-BitLinear for W_o and W_down (BitNet v2).
  a4.8    BitNet a4.8: squared-ReLU GLU; at 4-bit, 4-bit inputs to W_qkv and
          W_up,gate and top-K sparsified 8-bit inputs to W_o (and W_down).
`act_bits` (8 or 4) is the global activation width the a8 -> a4 switch flips;
`hadamard` ('none' | 'activation' | 'weight_and_activation') is the Table 5
ablation of the v2 rotation. `ptq_rotation` ('random_hadamard' | 'learned')
turns a b1.58 model into a post-training rotation baseline (QuaRot /
SpinQuant, Table 4; see rotated_linear.py and ptq.py). `quantized=False`
computes everything in float (latent weights, float activations): the
numerical reference of the rotation tests.

Shape letters used in names: B batch, L query length, S key length, D d_model,
H query heads, K kv heads, G query heads per kv head (H = K G), E head dim,
F d_ff, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitnet_jax import hadamard as hadamard_lib
from bitnet_jax import packing
from bitnet_jax import quant as quant_lib
from bitnet_jax import rotated_linear
from bitnet_jax.layers import (WEIGHT_FORMS, BitLinear, HBitLinear, Linear,
                               QuantConfig, RMSNorm)

VARIANTS = ("fp", "b1.58", "v2", "a4.8")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Logical axes of activations (their own names: a parameter's `embed` may be
# sharded over fsdp while the batch of an activation already is).
ACT_EMBED = ("activation_batch", "activation_length", "activation_embed")
ACT_MLP = ("activation_batch", "activation_length", "activation_mlp")
ACT_VOCAB = ("activation_batch", "activation_length", "activation_vocab")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that decides the model's function and shapes."""
  vocab_size: int
  d_model: int
  d_ff: int
  num_heads: int
  num_layers: int
  max_len: int
  num_kv_heads: int | None = None     # None: multi-head (= num_heads)
  variant: str = "v2"
  act_bits: int = 8
  hadamard: str = "activation"
  hadamard_block_size: int = hadamard_lib.DEFAULT_BLOCK_SIZE
  topk_ratio_o: float | None = 0.5    # a4.8 at 4 bits: W_o input top-K share
  topk_ratio_down: float | None = None  # a4.8 at 4 bits: W_down input top-K
  q_bits: int | None = None           # post-RoPE query bits (Tables 2-3)
  kv_bits: int | None = None          # post-RoPE key/value bits (BOS keeps 8)
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = "float32"              # compute dtype; latent weights are f32
  scan_layers: bool = True
  remat: str = "none"
  tie_embeddings: bool = False
  attention_impl: str | None = None   # None (backend's best), 'xla', 'cudnn'
  weights: str = "latent"             # 'int8' / 'packed': exported inference
  ptq_rotation: str = "none"          # b1.58 PTQ: random_hadamard | learned
  ptq_fused: bool = True              # PTQ: rotation fused into W_qkv, W_up,gate
  quantized: bool = True              # False: float weights and activations

  def __post_init__(self):
    def bad(field, msg):
      raise ValueError(f"model.{field}: {msg}")
    if self.variant not in VARIANTS:
      bad("variant", f"must be one of {VARIANTS}, got {self.variant!r}")
    if self.act_bits not in (8, 4):
      bad("act_bits", f"must be 8 or 4, got {self.act_bits!r}")
    if self.hadamard not in ("none", "activation", "weight_and_activation"):
      bad("hadamard", f"must be none, activation or weight_and_activation, got "
          f"{self.hadamard!r}")
    for field in ("q_bits", "kv_bits"):
      bits = getattr(self, field)
      if bits is not None and not 2 <= bits <= 8:
        bad(field, f"must be in [2, 8] or off, got {bits}")
    if self.weights not in WEIGHT_FORMS:
      bad("weights", f"must be one of {WEIGHT_FORMS}, got {self.weights!r}")
    if self.weights != "latent" and self.variant == "fp":
      bad("weights", "the fp baseline has no ternary weights to export")
    if self.ptq_rotation not in ("none",) + rotated_linear.KINDS:
      bad("ptq_rotation", f"must be none or one of {rotated_linear.KINDS}, got "
          f"{self.ptq_rotation!r}")
    if self.ptq_rotation != "none":
      if self.variant != "b1.58":
        bad("ptq_rotation", "the rotation baselines quantize a b1.58 model")
      if self.weights != "latent":
        bad("weights", "the rotation baselines run on latent weights")
      if self.ptq_rotation == "random_hadamard":
        for field in ("d_model", "d_ff"):
          try:
            hadamard_lib.check_size(getattr(self, field))
          except ValueError as e:
            bad(field, f"a random Hadamard rotation needs a Hadamard size: {e}")
    if self.remat not in REMAT_POLICIES:
      bad("remat", f"must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
    if self.dtype not in DTYPES:
      bad("dtype", f"must be one of {tuple(DTYPES)}, got {self.dtype!r}")
    for field in ("vocab_size", "d_model", "d_ff", "num_heads", "num_layers",
                  "max_len"):
      if getattr(self, field) <= 0:
        bad(field, f"must be positive, got {getattr(self, field)}")
    if self.d_model % self.num_heads:
      bad("num_heads", f"{self.num_heads} does not divide d_model {self.d_model}")
    if self.num_heads % self.kv_heads:
      bad("num_kv_heads", f"{self.kv_heads} does not divide num_heads "
          f"{self.num_heads}")
    if self.head_dim % 2:
      bad("num_heads", f"head dim {self.head_dim} must be even for RoPE")
    if self.variant == "v2" and self.hadamard != "none":
      for field, width in (("d_model", self.d_model), ("d_ff", self.d_ff)):
        try:
          hadamard_lib.check_size(width)
        except ValueError as e:
          bad(field, f"the H-BitLinear input width is not a Hadamard size: {e}")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_config(cls, config) -> "ModelConfig":
    """From a full config (groups `model` and `quant`; 0 / "" mean off)."""
    m, q = config.model, config.quant
    return cls(
        vocab_size=m.vocab_size, d_model=m.d_model, d_ff=m.d_ff,
        num_heads=m.num_heads, num_layers=m.num_layers, max_len=m.seq_len,
        num_kv_heads=m.num_kv_heads or None, variant=m.variant,
        act_bits=q.act_bits, hadamard=q.hadamard,
        hadamard_block_size=q.hadamard_block_size,
        topk_ratio_o=q.topk_ratio_o or None,
        topk_ratio_down=q.topk_ratio_down or None,
        q_bits=q.q_bits or None, kv_bits=q.kv_bits or None,
        rope_theta=m.rope_theta, norm_eps=m.norm_eps, init_std=m.init_std,
        dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat,
        tie_embeddings=m.tie_embeddings,
        attention_impl=m.attention_impl or None,
        ptq_rotation=q.get("ptq_rotation", "") or "none",
        ptq_fused=q.get("ptq_fused", True))


def make_linear(cfg: ModelConfig, role: str, features, kernel_axes,
                name: str) -> nn.Module:
  """The layer of one projection. role: 'qkv', 'up_gate', 'o' or 'down'."""
  common = dict(features=features, kernel_axes=kernel_axes,
                dtype=cfg.compute_dtype, name=name,
                kernel_init=nn.initializers.normal(stddev=cfg.init_std))
  if cfg.variant == "fp":
    return Linear(**common)
  bits = cfg.act_bits
  block = cfg.hadamard_block_size
  intermediate = role in ("o", "down")
  bit_common = dict(common, norm_eps=cfg.norm_eps)
  if cfg.ptq_rotation != "none":
    q = (QuantConfig(act_bits=bits, int4_scale="absmax",
                     hadamard_block_size=block) if cfg.quantized else
         QuantConfig.off())
    # Table 4: only W_qkv and W_up,gate give up the fusion; W_o and W_down
    # keep the rotation fused into their ternary weights.
    return rotated_linear.RotatedBitLinear(
        kind=cfg.ptq_rotation, fused=cfg.ptq_fused or intermediate, quant=q,
        **bit_common)
  if not cfg.quantized:
    rotation = linear_rotation(cfg, role)
    if rotation != "none":
      return HBitLinear(quant=QuantConfig.off(), rotation=rotation, **bit_common)
    return BitLinear(quant=QuantConfig.off(), **bit_common)
  if cfg.variant == "a4.8" and bits == 4 and intermediate:
    ratio = cfg.topk_ratio_o if role == "o" else cfg.topk_ratio_down
    q = QuantConfig(act_bits=8, topk_ratio=ratio, hadamard_block_size=block,
                    weights=cfg.weights)
    return BitLinear(quant=q, **bit_common)
  q = QuantConfig(act_bits=bits, hadamard_block_size=block, weights=cfg.weights)
  rotation = linear_rotation(cfg, role)
  if rotation != "none":
    return HBitLinear(quant=q, rotation=rotation, **bit_common)
  return BitLinear(quant=q, **bit_common)


def linear_rotation(cfg: ModelConfig, role: str) -> str:
  """The rotation flag of a projection: H-BitLinear for W_o and W_down of v2."""
  if cfg.variant == "v2" and role in ("o", "down"):
    return cfg.hadamard
  return "none"


def apply_rope(x_BLNE: jax.Array, positions_BL: jax.Array,
               theta: float) -> jax.Array:
  """Rotary embedding (rotate-half form) on the last axis, float32 math."""
  half = x_BLNE.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions_BL.astype(jnp.float32)[..., None, None] * freq
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x = x_BLNE.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLNE.dtype)


class Attention(nn.Module):
  """Causal self-attention. With decode_len > 0 it keeps a KV cache of that
  many positions in the `cache` collection (see generate.py): each call
  appends its tokens and attends to everything cached so far."""
  cfg: ModelConfig
  decode_len: int = 0

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL=None, bos_BL=None,
               valid_BL=None):
    cfg = self.cfg
    b, l, _ = x_BLD.shape
    k_heads, e = cfg.kv_heads, cfg.head_dim
    g = cfg.num_heads // k_heads
    qkv = make_linear(cfg, "qkv", (k_heads, g + 2, e),
                      ("embed", "kv_heads", None, "head_dim"), "qkv")(x_BLD)
    q_BLHE = qkv[..., :g, :].reshape(b, l, k_heads * g, e)  # head = k * G + g
    k_BLKE = qkv[..., g, :]
    v_BLKE = qkv[..., g + 1, :]
    q_BLHE = apply_rope(q_BLHE, positions_BL, cfg.rope_theta)
    k_BLKE = apply_rope(k_BLKE, positions_BL, cfg.rope_theta)
    # Low-bit attention states (Tables 2-3): post-RoPE, per token and head;
    # the K/V of BOS tokens keep 8 bits.
    q_BLHE = quant_lib.quantize_heads_keep_bos(q_BLHE, cfg.q_bits, None)
    if self.decode_len and cfg.kv_bits is not None:
      # The cache holds the codes themselves (see _attend_quantized_cache).
      out_BLHE = self._attend_quantized_cache(q_BLHE, k_BLKE, v_BLKE, bos_BL,
                                              valid_BL)
      return self._output(out_BLHE)
    k_BLKE = quant_lib.quantize_heads_keep_bos(k_BLKE, cfg.kv_bits, bos_BL)
    v_BLKE = quant_lib.quantize_heads_keep_bos(v_BLKE, cfg.kv_bits, bos_BL)
    if self.decode_len:
      out_BLHE = self._attend_cached(q_BLHE, k_BLKE, v_BLKE, valid_BL)
    else:
      mask = None
      if segment_ids_BL is not None:
        mask = (segment_ids_BL[:, None, :, None] ==
                segment_ids_BL[:, None, None, :])
      out_BLHE = jax.nn.dot_product_attention(
          q_BLHE, k_BLKE, v_BLKE, mask=mask, is_causal=True,
          implementation=cfg.attention_impl)
    return self._output(out_BLHE)

  def _output(self, out_BLHE):
    b, l, h, e = out_BLHE.shape
    return make_linear(self.cfg, "o", self.cfg.d_model, ("heads", "embed"),
                       "o")(out_BLHE.reshape(b, l, h * e))

  def _attend_quantized_cache(self, q_BLHE, k_BLKE, v_BLKE, bos_BL, valid_BL):
    """KV cache stored as codes: kv_bits <= 4 packs two codes per byte, plus
    one float32 absmax per token and head; the first BOS of each row keeps
    8-bit codes in a side slot (Sec. 3.1). Reading dequantizes exactly as
    `quant.quantize_heads` does, so cached decoding equals the full forward
    pass with the same kv_bits."""
    cfg = self.cfg
    bits = cfg.kv_bits
    b, l, k_heads, e = k_BLKE.shape
    s = self.decode_len
    packed = bits <= 4
    width = e // 2 if packed else e
    i, mask = self._cache_slots(b, l, valid_BL)
    bos_pos = self.variable("cache", "bos_pos", lambda: jnp.full((b,), -1, jnp.int32))
    if bos_BL is None:
      bos_BL = jnp.zeros((b, l), jnp.bool_)
    has_bos = jnp.any(bos_BL, axis=1) & (bos_pos.value < 0)
    first_bos = jnp.argmax(bos_BL, axis=1)
    new_bos_pos = jnp.where(has_bos, i + first_bos, bos_pos.value)
    read = {}
    for name, x in (("keys", k_BLKE), ("values", v_BLKE)):
      codes = self.variable("cache", f"{name}_codes", jnp.zeros,
                            (b, s, k_heads, width), jnp.uint8)
      gamma = self.variable("cache", f"{name}_absmax", jnp.zeros,
                            (b, s, k_heads, 1), jnp.float32)
      bos_codes = self.variable("cache", f"{name}_bos_codes", jnp.zeros,
                                (b, k_heads, e), jnp.uint8)
      bos_gamma = self.variable("cache", f"{name}_bos_absmax", jnp.zeros,
                                (b, k_heads, 1), jnp.float32)
      c, _, g = quant_lib.head_codes(x, bits)
      stored = packing.pack_nibbles(c) if packed else c
      codes.value = jax.lax.dynamic_update_slice(codes.value, stored, (0, i, 0, 0))
      gamma.value = jax.lax.dynamic_update_slice(gamma.value, g, (0, i, 0, 0))
      row_x = jnp.take_along_axis(x, first_bos[:, None, None, None], axis=1)[:, 0]
      c8, _, g8 = quant_lib.head_codes(row_x, 8)
      bos_codes.value = jnp.where(has_bos[:, None, None], c8, bos_codes.value)
      bos_gamma.value = jnp.where(has_bos[:, None, None], g8, bos_gamma.value)
      all_codes = packing.unpack_nibbles(codes.value) if packed else codes.value
      deq = quant_lib.dequantize_heads(all_codes, gamma.value, bits, x.dtype)
      deq8 = quant_lib.dequantize_heads(bos_codes.value, bos_gamma.value, 8,
                                        x.dtype)
      is_bos = jnp.arange(s)[None, :] == new_bos_pos[:, None]
      read[name] = jnp.where(is_bos[:, :, None, None], deq8[:, None], deq)
    bos_pos.value = new_bos_pos
    return jax.nn.dot_product_attention(q_BLHE, read["keys"], read["values"],
                                        mask=mask,
                                        implementation=cfg.attention_impl)

  def _cache_slots(self, b, l, valid_BL):
    """Advance the cache by this call's l tokens: (their first slot i, the
    attention mask [B, 1, l, S] of valid, causally visible slots)."""
    s = self.decode_len
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    valid = self.variable("cache", "valid", jnp.zeros, (b, s), jnp.bool_)
    i = index.value
    new_valid = jnp.ones((b, l), jnp.bool_) if valid_BL is None else valid_BL
    valid.value = jax.lax.dynamic_update_slice(valid.value, new_valid, (0, i))
    index.value = i + l
    key_pos = jnp.arange(s)
    query_pos = i + jnp.arange(l)
    mask = (valid.value[:, None, None, :] &
            (key_pos[None, None, None, :] <= query_pos[None, None, :, None]))
    return i, mask

  def _attend_cached(self, q_BLHE, k_BLKE, v_BLKE, valid_BL):
    b, l, k_heads, e = k_BLKE.shape
    s = self.decode_len
    i, mask = self._cache_slots(b, l, valid_BL)
    keys = self.variable("cache", "keys", jnp.zeros, (b, s, k_heads, e),
                         k_BLKE.dtype)
    values = self.variable("cache", "values", jnp.zeros, (b, s, k_heads, e),
                           v_BLKE.dtype)
    keys.value = jax.lax.dynamic_update_slice(keys.value, k_BLKE, (0, i, 0, 0))
    values.value = jax.lax.dynamic_update_slice(values.value, v_BLKE,
                                                (0, i, 0, 0))
    return jax.nn.dot_product_attention(q_BLHE, keys.value, values.value,
                                        mask=mask,
                                        implementation=self.cfg.attention_impl)


class FeedForward(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.cfg
    up_gate = make_linear(cfg, "up_gate", (2, cfg.d_ff), ("embed", None, "mlp"),
                          "up_gate")(x_BLD)
    up_BLF, gate_BLF = up_gate[..., 0, :], up_gate[..., 1, :]
    if cfg.variant == "a4.8":
      act = jnp.square(jax.nn.relu(gate_BLF))  # squared-ReLU GLU
    else:
      act = jax.nn.silu(gate_BLF)              # SwiGLU
    h_BLF = nn.with_logical_constraint(act * up_BLF, ACT_MLP)
    return make_linear(cfg, "down", cfg.d_model, ("mlp", "embed"), "down")(h_BLF)


class Block(nn.Module):
  cfg: ModelConfig
  decode_len: int = 0

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL, bos_BL, valid_BL):
    cfg = self.cfg
    pre_norm = cfg.variant == "fp"
    h = RMSNorm(cfg.norm_eps, name="attn_norm")(x_BLD) if pre_norm else x_BLD
    x_BLD = x_BLD + Attention(cfg, self.decode_len, name="attn")(
        h, positions_BL, segment_ids_BL, bos_BL, valid_BL)
    h = RMSNorm(cfg.norm_eps, name="ffn_norm")(x_BLD) if pre_norm else x_BLD
    x_BLD = x_BLD + FeedForward(cfg, name="ffn")(h)
    x_BLD = nn.with_logical_constraint(x_BLD, ACT_EMBED)
    return x_BLD, None


class Transformer(nn.Module):
  """tokens [B, L] (int) -> logits [B, L, V] (float32).

  positions_BL: RoPE positions (default 0 .. L-1); segment_ids_BL: packed
  documents attend only within their segment; bos_BL: which tokens are BOS
  (their K/V keep 8 bits when kv_bits is set; default: position 0).
  decode_len > 0: incremental decoding with a KV cache of that many positions
  (collection `cache`); valid_BL then marks real (not padding) tokens.
  """
  cfg: ModelConfig
  decode_len: int = 0

  @nn.compact
  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None,
               bos_BL=None, valid_BL=None):
    cfg = self.cfg
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]),
                                      tokens_BL.shape)
    if bos_BL is None and cfg.kv_bits is not None:
      bos_BL = positions_BL == 0
    embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=cfg.init_std), ("vocab", "embed")),
        name="embed")
    x_BLD = embed(tokens_BL).astype(cfg.compute_dtype)
    x_BLD = nn.with_logical_constraint(x_BLD, ACT_EMBED)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat],
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0, "intermediates": 0,
                                            "cache": 0},
                      split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * 4,
                      length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BLD, _ = stack(cfg, self.decode_len, name="layers")(
          x_BLD, positions_BL, segment_ids_BL, bos_BL, valid_BL)
    else:
      for i in range(cfg.num_layers):
        x_BLD, _ = block(cfg, self.decode_len, name=f"layer_{i}")(
            x_BLD, positions_BL, segment_ids_BL, bos_BL, valid_BL)

    x_BLD = RMSNorm(cfg.norm_eps, name="final_norm")(x_BLD)
    if cfg.tie_embeddings:
      logits = embed.attend(x_BLD.astype(jnp.float32))
    else:
      logits = Linear(cfg.vocab_size, ("embed", "vocab"),
                      dtype=cfg.compute_dtype, name="head",
                      kernel_init=nn.initializers.normal(stddev=cfg.init_std)
                      )(x_BLD)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ACT_VOCAB)


def param_shapes(cfg: ModelConfig, batch: int = 1, length: int | None = None):
  """Abstract (unboxed) parameter tree from jax.eval_shape: nothing allocated."""
  length = length or min(cfg.max_len, 8)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  variables = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), tokens)
  return nn.meta.unbox(variables["params"])


def count_params(params: Any, non_embedding: bool = False) -> int:
  """Number of parameters; non_embedding drops the embedding and the head."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    top = getattr(path[0], "key", None)
    if non_embedding and top in ("embed", "head"):
      continue
    total += math.prod(leaf.shape)
  return total
