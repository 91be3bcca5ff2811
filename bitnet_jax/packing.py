"""Bit packing for inference: ternary weights at 2 bits, KV codes at 4 bits.

Ternary codes {-1, 0, 1} are stored as c + 1 in {0, 1, 2}, four per byte, the
first value in the lowest two bits, along the flattened (row-major) tensor;
the tail is padded with code 0. Unsigned 4-bit codes are stored two per byte
along the last axis (low nibble first). Both have numpy (export, files) and
jnp (inside jitted inference) forms that produce identical bytes.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

_SHIFTS = np.array([0, 2, 4, 6], np.uint8)


def packed_ternary_size(shape) -> int:
  return -(-math.prod(shape) // 4)


def pack_ternary(codes: np.ndarray) -> np.ndarray:
  """int codes in {-1, 0, 1} of any shape -> uint8 [ceil(size / 4)]."""
  flat = np.asarray(codes).reshape(-1)
  if flat.size and (flat.min() < -1 or flat.max() > 1):
    raise ValueError("ternary codes must be in {-1, 0, 1}")
  padded = np.ones(4 * packed_ternary_size(flat.shape), np.uint8)  # code 0
  padded[:flat.size] = (flat + 1).astype(np.uint8)
  return np.bitwise_or.reduce(padded.reshape(-1, 4) << _SHIFTS, axis=1).astype(
      np.uint8)


def unpack_ternary(packed, shape, xp=jnp):
  """uint8 [ceil(size / 4)] -> int8 codes of `shape` (numpy or jnp)."""
  size = math.prod(shape)
  if packed.shape != (packed_ternary_size(shape),):
    raise ValueError(f"packed ternary data has shape {packed.shape}, expected "
                     f"({packed_ternary_size(shape)},) for a {tuple(shape)} tensor")
  fields = (packed[:, None] >> xp.asarray(_SHIFTS)) & 3
  codes = fields.reshape(-1)[:size].astype(xp.int8) - 1
  return codes.reshape(shape)


def pack_nibbles(codes):
  """uint8 codes < 16 [..., E] (E even) -> uint8 [..., E / 2] (jnp)."""
  pairs = codes.reshape(*codes.shape[:-1], -1, 2).astype(jnp.uint8)
  return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed):
  """uint8 [..., E / 2] -> uint8 codes [..., E] (jnp)."""
  both = jnp.stack([packed & 15, packed >> 4], axis=-1)
  return both.reshape(*packed.shape[:-1], -1)
