"""LLaMA-like decoder (RoPE, causal attention, GLU FFN, no biases) and its variants.

Variants (ModelConfig.variant: fp, b1.58, v2, a4.8) and their ablations are
one model: what each projection, the attention states and the FFN do is the
quantization policy's answer (policy.py), and every quantized projection is
the one linear pipeline of layers.BitLinear. The config (model_config.py)
holds everything that decides the function and shapes.

Shape letters used in names: B batch, L query length, S key length, D d_model,
H query heads, K kv heads, G query heads per kv head (H = K G), E head dim,
F d_ff, V vocabulary.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitnet_jax import policy
from bitnet_jax import quant as quant_lib
from bitnet_jax import sites
from bitnet_jax.kernels import splash
from bitnet_jax.kv_cache import KVCache
from bitnet_jax.layers import BitLinear, Linear, RMSNorm
from bitnet_jax.model_config import REMAT_POLICIES, ModelConfig

__all__ = ["ModelConfig", "Transformer", "param_shapes", "count_params",
           "apply_rope"]

# Logical axes of activations (their own names: a parameter's `embed` may be
# sharded over fsdp while the batch of an activation already is).
ACT_EMBED = ("activation_batch", "activation_length", "activation_embed")
ACT_MLP = ("activation_batch", "activation_length", "activation_mlp")
ACT_VOCAB = ("activation_batch", "activation_length", "activation_vocab")


def projection(cfg: ModelConfig, site: sites.Site, features,
               kernel_axes) -> nn.Module:
  """The layer of one projection, as the policy says."""
  rule = policy.linear(cfg, site.name)
  common = dict(features=features, kernel_axes=kernel_axes,
                dtype=cfg.compute_dtype, name=site.name,
                kernel_init=nn.initializers.normal(stddev=cfg.init_std))
  if rule.quant is None:
    return Linear(**common)
  return BitLinear(quant=rule.quant, rotation=rule.rotation, fused=rule.fused,
                   scale_groups=rule.scale_groups, centre=rule.centre,
                   norm_eps=cfg.norm_eps, **common)


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
  many positions (kv_cache.py): each call appends its tokens and attends to
  everything cached so far."""
  cfg: ModelConfig
  decode_len: int = 0

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL=None, bos_BL=None,
               valid_BL=None):
    cfg = self.cfg
    b, l, _ = x_BLD.shape
    k_heads, e = cfg.kv_heads, cfg.head_dim
    g = cfg.num_heads // k_heads
    qkv = projection(cfg, sites.QKV, (k_heads, g + 2, e),
                     ("embed", "kv_heads", None, "head_dim"))(x_BLD)
    q_BLHE = qkv[..., :g, :].reshape(b, l, k_heads * g, e)  # head = k * G + g
    k_BLKE = qkv[..., g, :]
    v_BLKE = qkv[..., g + 1, :]
    q_BLHE = apply_rope(q_BLHE, positions_BL, cfg.rope_theta)
    k_BLKE = apply_rope(k_BLKE, positions_BL, cfg.rope_theta)
    # Low-bit attention states (Tables 2-3): post-RoPE, per token and head;
    # the K/V of BOS tokens keep 8 bits.
    kv_bits = policy.kv_bits(cfg)
    q_BLHE = quant_lib.quantize_heads_keep_bos(q_BLHE, policy.query_bits(cfg),
                                               None)
    impl = policy.attention_impl(cfg)
    if impl.startswith("splash") and (self.decode_len or not
                                      splash.applies(l)):
      impl = "xla"  # a cache, or a sequence splash does not tile: XLA's
    if self.decode_len and kv_bits is not None:
      # the cache quantizes (and stores the codes) itself
      out_BLHE = KVCache(self.decode_len, kv_bits, impl, name="kv_cache")(
          q_BLHE, k_BLKE, v_BLKE, bos_BL, valid_BL)
      return self._output(out_BLHE)
    k_BLKE = quant_lib.quantize_heads_keep_bos(k_BLKE, kv_bits, bos_BL)
    v_BLKE = quant_lib.quantize_heads_keep_bos(v_BLKE, kv_bits, bos_BL)
    if self.decode_len:
      out_BLHE = KVCache(self.decode_len, None, impl, name="kv_cache")(
          q_BLHE, k_BLKE, v_BLKE, bos_BL, valid_BL)
    elif impl.startswith("splash"):  # TPU: blocked, no [B, H, T, T] scores
      out_BLHE = splash.attention(q_BLHE, k_BLKE, v_BLKE, segment_ids_BL,
                                  cfg.attention_block,
                                  interpret=impl == "splash_interpret")
    else:
      mask = None
      if segment_ids_BL is not None:
        mask = (segment_ids_BL[:, None, :, None] ==
                segment_ids_BL[:, None, None, :])
      out_BLHE = jax.nn.dot_product_attention(
          q_BLHE, k_BLKE, v_BLKE, mask=mask, is_causal=True,
          implementation=impl)
    return self._output(out_BLHE)

  def _output(self, out_BLHE):
    b, l, h, e = out_BLHE.shape
    return projection(self.cfg, sites.O, self.cfg.d_model,
                      ("heads", "embed"))(out_BLHE.reshape(b, l, h * e))


GLU_ACTIVATIONS = {"swiglu": jax.nn.silu,
                   "relu2": lambda x: jnp.square(jax.nn.relu(x))}


class FeedForward(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.cfg
    up_gate = projection(cfg, sites.UP_GATE, (2, cfg.d_ff),
                         ("embed", None, "mlp"))(x_BLD)
    up_BLF, gate_BLF = up_gate[..., 0, :], up_gate[..., 1, :]
    act = GLU_ACTIVATIONS[policy.glu_activation(cfg)](gate_BLF)
    h_BLF = nn.with_logical_constraint(act * up_BLF, ACT_MLP)
    return projection(cfg, sites.DOWN, cfg.d_model, ("mlp", "embed"))(h_BLF)


class Block(nn.Module):
  cfg: ModelConfig
  decode_len: int = 0

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL, bos_BL, valid_BL):
    cfg = self.cfg
    pre_norm = policy.block_pre_norms(cfg)
    h = RMSNorm(cfg.norm_eps, name="attn_norm")(x_BLD) if pre_norm else x_BLD
    x_BLD = x_BLD + Attention(cfg, self.decode_len, name=sites.QKV.block)(
        h, positions_BL, segment_ids_BL, bos_BL, valid_BL)
    h = RMSNorm(cfg.norm_eps, name="ffn_norm")(x_BLD) if pre_norm else x_BLD
    x_BLD = x_BLD + FeedForward(cfg, name=sites.DOWN.block)(h)
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
    if bos_BL is None and policy.kv_bits(cfg) is not None:
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
                      dtype=cfg.compute_dtype, name=sites.HEAD,
                      kernel_init=nn.initializers.normal(stddev=cfg.init_std)
                      )(x_BLD)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ACT_VOCAB)


def param_shapes(cfg: ModelConfig, batch: int = 1, length: int | None = None):
  """Abstract (unboxed) parameter tree from jax.eval_shape: nothing allocated."""
  length = length or min(cfg.seq_len, 8)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  variables = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), tokens)
  return nn.meta.unbox(variables["params"])


def count_params(params: Any, non_embedding: bool = False) -> int:
  """Number of parameters; non_embedding drops the embedding and the head."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    top = getattr(path[0], "key", None)
    if non_embedding and top in ("embed", sites.HEAD):
      continue
    total += math.prod(leaf.shape)
  return total
