"""The KV cache of incremental decoding (collection `cache`, see generate.py).

Each call appends its l tokens' keys and values at the cache index and
attends its queries to every valid, causally visible slot so far. With
`bits` set the cache holds codes instead of floats: bits <= 4 packs two
codes per byte, plus one float32 absmax per token and head; the first BOS of
each row keeps 8-bit codes in a side slot (Sec. 3.1). Reading dequantizes
exactly as `quant.quantize_heads` does, so cached decoding equals the full
forward pass with the same kv_bits.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitnet_jax import packing
from bitnet_jax import quant as quant_lib

BOS_BITS = 8


class KVCache(nn.Module):
  """length: cache slots; bits: None (float cache) or the K/V code width."""
  length: int
  bits: int | None = None
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, q_BLHE, k_BLKE, v_BLKE, bos_BL=None, valid_BL=None):
    b, l = k_BLKE.shape[:2]
    i, mask = self._advance(b, l, valid_BL)
    if self.bits is None:
      keys = self._append("keys", k_BLKE, i)
      values = self._append("values", v_BLKE, i)
    else:
      keys, values = self._append_codes(k_BLKE, v_BLKE, bos_BL, i)
    return jax.nn.dot_product_attention(q_BLHE, keys, values, mask=mask,
                                        implementation=self.attention_impl)

  def _advance(self, b, l, valid_BL):
    """Advance by this call's l tokens: (their first slot i, the attention
    mask [B, 1, l, S] of valid, causally visible slots)."""
    s = self.length
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

  def _append(self, name, x_BLKE, i):
    b, _, k_heads, e = x_BLKE.shape
    slots = self.variable("cache", name, jnp.zeros, (b, self.length, k_heads, e),
                          x_BLKE.dtype)
    slots.value = jax.lax.dynamic_update_slice(slots.value, x_BLKE, (0, i, 0, 0))
    return slots.value

  def _append_codes(self, k_BLKE, v_BLKE, bos_BL, i):
    bits, s = self.bits, self.length
    b, l, k_heads, e = k_BLKE.shape
    packed = bits <= 4
    width = e // 2 if packed else e
    bos_pos = self.variable("cache", "bos_pos",
                            lambda: jnp.full((b,), -1, jnp.int32))
    if bos_BL is None:
      bos_BL = jnp.zeros((b, l), jnp.bool_)
    has_bos = jnp.any(bos_BL, axis=1) & (bos_pos.value < 0)
    first_bos = jnp.argmax(bos_BL, axis=1)
    new_bos_pos = jnp.where(has_bos, i + first_bos, bos_pos.value)
    is_bos = jnp.arange(s)[None, :] == new_bos_pos[:, None]
    read = []
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
      c8, _, g8 = quant_lib.head_codes(row_x, BOS_BITS)
      bos_codes.value = jnp.where(has_bos[:, None, None], c8, bos_codes.value)
      bos_gamma.value = jnp.where(has_bos[:, None, None], g8, bos_gamma.value)
      all_codes = packing.unpack_nibbles(codes.value) if packed else codes.value
      deq = quant_lib.dequantize_heads(all_codes, gamma.value, bits, x.dtype)
      deq8 = quant_lib.dequantize_heads(bos_codes.value, bos_gamma.value,
                                        BOS_BITS, x.dtype)
      read.append(jnp.where(is_bos[:, :, None, None], deq8[:, None], deq))
    bos_pos.value = new_bos_pos
    return read
