"""Orthonormal fast Walsh-Hadamard transform (BitNet v2, Eq. 3-4 and Eq. 8).

`fwht(x)` multiplies the last axis of `x` by the orthonormal Hadamard matrix
H_n / sqrt(n). Every matrix used here is symmetric, so the transform is its own
inverse and its own transpose: `fwht(fwht(x)) == x`, and the backward pass of
Eq. 8 ("apply the Hadamard to the gradient") is exactly the transposed
transform.

Supported sizes are n = K * 2^k where
  * K = 1 (plain powers of two: the Sylvester matrices of Eq. 4), or
  * K is the order of a Hadamard matrix built here by Paley's constructions from
    a prime q: Paley I, K = q + 1 with q = 3 (mod 4); Paley II, K = 2(q + 1)
    with q = 1 (mod 4). Paley I is preferred when both apply. Orders 12, 20,
    28, 36, 44, 60, 108, 140, ... (e.g. 6912 = 108 * 64).
Any other size raises ValueError naming the nearest supported sizes; the input
is never zero-padded (padding would break orthogonality).

Algorithm (pure jnp, O(n log n)): the Sylvester part H_{2^k} is the Kronecker
product of smaller Sylvester matrices, so the last axis is reshaped into
factors and each factor is transformed in turn:
  * block_size == 2: the classic radix-2 butterfly, log2(n) add/sub stages;
  * block_size  > 2: mixed-radix stages, each a small dense Sylvester block
    (<= block_size) applied by matmul. Same O(n log n) operation count family,
    far fewer passes over memory, and it runs on matrix units (MXU, tensor
    cores). The default, DEFAULT_BLOCK_SIZE, was chosen by `python -m
    bitnet_jax.bench`.
The K part (Paley) is one dense K x K matmul. Arithmetic is float32 whatever
the input dtype (bf16 results carry a single final rounding), and the result
is cast back to the input dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Largest Paley order K used for the dense non-power-of-two factor.
MAX_PALEY_ORDER = 1024
# Largest dense Sylvester block of the mixed-radix form (see module docstring).
DEFAULT_BLOCK_SIZE = 64


def _is_prime(q: int) -> bool:
  if q < 2:
    return False
  if q % 2 == 0:
    return q == 2
  f = 3
  while f * f <= q:
    if q % f == 0:
      return False
    f += 2
  return True


def _paley_kind(order: int) -> str | None:
  """'I' or 'II' if `order` is built by a Paley construction here, else None."""
  if order < 4 or order % 4 or order > MAX_PALEY_ORDER:
    return None
  if _is_prime(order - 1) and (order - 1) % 4 == 3:
    return "I"
  if _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
    return "II"
  return None


def _jacobsthal(q: int) -> np.ndarray:
  """Q[i, j] = chi(j - i), chi the quadratic character of the field Z_q."""
  chi = -np.ones(q, dtype=np.int64)
  chi[0] = 0
  chi[(np.arange(1, q) ** 2) % q] = 1
  return chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]


@functools.lru_cache(maxsize=None)
def paley_matrix(order: int) -> np.ndarray:
  """Symmetric +-1 Hadamard matrix of a Paley order (H H^T = order * I)."""
  kind = _paley_kind(order)
  if kind is None:
    raise ValueError(f"{order} is not a Paley order built here")
  if kind == "I":
    q = order - 1
    h = np.eye(order, dtype=np.int64)
    h[0, 1:] += 1
    h[1:, 0] -= 1
    h[1:, 1:] += _jacobsthal(q)
    # The Paley I matrix is skew-type; reversing the core columns (j -> -j mod
    # q) makes the Jacobsthal block symmetric, negating column 0 fixes the
    # border. Column signed permutations keep the matrix Hadamard.
    h = h[:, np.r_[0, 1 + (-np.arange(q)) % q]]
    h[:, 0] *= -1
  else:
    q = order // 2 - 1
    conf = np.zeros((q + 1, q + 1), dtype=np.int64)
    conf[0, 1:] = 1
    conf[1:, 0] = 1
    conf[1:, 1:] = _jacobsthal(q)
    h = (np.kron(conf, [[1, 1], [1, -1]])
         + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]]))
  h.setflags(write=False)
  return h


@functools.lru_cache(maxsize=None)
def sylvester_matrix(order: int) -> np.ndarray:
  """The +-1 Sylvester-Hadamard matrix of Eq. 4 (without the 1/sqrt 2)."""
  if order < 1 or order & (order - 1):
    raise ValueError(f"Sylvester order must be a power of two, got {order}")
  h = np.ones((1, 1), dtype=np.int64)
  while h.shape[0] < order:
    h = np.block([[h, h], [h, -h]])
  h.setflags(write=False)
  return h


@functools.lru_cache(maxsize=None)
def split_size(n: int) -> tuple[int, int] | None:
  """(K, 2^k) with n = K * 2^k and the smallest usable K, or None."""
  if n < 1:
    return None
  power = n & -n  # largest power of two dividing n
  odd = n // power
  if odd == 1:
    return 1, n
  k_order = odd
  while k_order <= n:
    if _paley_kind(k_order):
      return k_order, n // k_order
    k_order *= 2
  return None


def is_supported(n: int) -> bool:
  return split_size(n) is not None


def nearest_supported(n: int) -> tuple[int | None, int]:
  """The largest supported size below n (None if none) and the smallest above."""
  below = next((m for m in range(n - 1, 0, -1) if is_supported(m)), None)
  above = next(m for m in range(n + 1, 2 * n + 2) if is_supported(m))
  return below, above


def check_size(n: int) -> tuple[int, int]:
  """(K, 2^k) for a supported size, else a ValueError naming neighbours."""
  split = split_size(n)
  if split is None:
    below, above = nearest_supported(n)
    raise ValueError(
        f"fwht: size {n} is not supported. Supported sizes are K * 2^k with K "
        "= 1 or a Paley order (12, 20, 28, 36, 44, 60, 108, 140, ...); the "
        f"nearest supported sizes are {below} and {above}. Zero-padding is not "
        "offered: it breaks orthogonality.")
  return split


def _radix_factors(power: int, block_size: int) -> list[int]:
  """Split a power of two into balanced power-of-two factors <= block_size."""
  if power == 1:
    return []
  bits = power.bit_length() - 1
  max_bits = block_size.bit_length() - 1
  count = -(-bits // max_bits)
  base, extra = divmod(bits, count)
  return [2 ** (base + (i < extra)) for i in range(count)]


def _butterfly(y: jax.Array) -> jax.Array:
  """Radix-2 butterfly over the last axis of y[rows, m] (m a power of two)."""
  rows, m = y.shape
  half = 1
  while half < m:
    z = y.reshape(rows, m // (2 * half), 2, half)
    a, b = z[:, :, 0, :], z[:, :, 1, :]
    y = jnp.stack([a + b, a - b], axis=2).reshape(rows, m)
    half *= 2
  return y


def _apply_along(y: jax.Array, matrix: np.ndarray, axis: int) -> jax.Array:
  """Multiply axis `axis` of y by the symmetric +-1 matrix."""
  m = jnp.asarray(matrix, dtype=jnp.float32)
  out = jnp.tensordot(y, m, axes=[[axis], [0]],
                      precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(out, -1, axis)


@functools.partial(jax.jit, static_argnums=1)
def _fwht_impl(x: jax.Array, block_size: int) -> jax.Array:
  n = x.shape[-1]
  k_order, power = check_size(n)
  lead = x.shape[:-1]
  y = x.astype(jnp.float32).reshape(-1, k_order, power)
  if power > 1:
    if block_size <= 2:
      y = _butterfly(y.reshape(-1, power)).reshape(-1, k_order, power)
    else:
      factors = _radix_factors(power, block_size)
      y = y.reshape(-1, k_order, *factors)
      for i, f in enumerate(factors):
        y = _apply_along(y, sylvester_matrix(f), 2 + i)
  if k_order > 1:
    y = _apply_along(y.reshape(-1, k_order, power), paley_matrix(k_order), 1)
  y = y.reshape(*lead, n) * np.float32(1.0 / np.sqrt(n))
  return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fwht(x: jax.Array, block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
  """Orthonormal Walsh-Hadamard transform along the last axis of `x`.

  Args:
    x: array [..., n], float32 or bfloat16, n a supported size (see module).
    block_size: 2 for the radix-2 butterfly; a power of two > 2 for the
      mixed-radix form whose dense Sylvester blocks are at most this large.
  Returns:
    x @ H_n / sqrt(n), same shape and dtype as x.
  """
  return _fwht_impl(x, block_size)


def _fwht_fwd(x, block_size):
  return _fwht_impl(x, block_size), None


def _fwht_bwd(block_size, _, g):
  # Eq. 8: dL/dX = H^T dL/dY; every matrix here is symmetric, so H^T = H.
  return (_fwht_impl(g, block_size),)


fwht.defvjp(_fwht_fwd, _fwht_bwd)


def shardable(n: int, shards: int) -> bool:
  """Whether `fwht_sharded` can transform a size-n axis split in `shards`
  contiguous pieces: n a power of two (H_n = H_t (x) H_{n/t}) and n >= t^2."""
  return (shards > 1 and n & (n - 1) == 0 and shards & (shards - 1) == 0
          and n >= shards * shards)


def fwht_sharded(x: jax.Array, axis_name: str, shards: int,
                 block_size: int = DEFAULT_BLOCK_SIZE,
                 batch_axes=None) -> jax.Array:
  """`fwht(x)` for an x whose last axis is split in `shards` contiguous
  pieces over the mesh axis `axis_name` (tensor parallelism), without
  gathering it. H_n = H_t (x) H_{n/t} for Sylvester sizes, so each shard
  transforms its own piece (H_{n/t}, local butterflies) and one cross-shard
  stage mixes the t pieces (H_t): an all-to-all gives every shard one chunk
  of every piece, a t-point transform mixes them, and an all-to-all returns
  the chunks. Traffic: 2 (t - 1) / t^2 of the activation per shard, against
  (t - 1) / t for gathering it. Must run under `jax.set_mesh`; `batch_axes`
  (mesh axes splitting the leading axis) keeps the batch sharded inside. The
  backward pass is the same transform (H is symmetric), by autodiff."""
  n = x.shape[-1]
  if not shardable(n, shards):
    raise ValueError(f"fwht_sharded: size {n} over {shards} shards needs a "
                     "power of two at least shards^2")
  spec = jax.sharding.PartitionSpec(batch_axes, *([None] * (x.ndim - 2)),
                                    axis_name)
  h_t = jnp.asarray(sylvester_matrix(shards), jnp.float32) / np.sqrt(shards)

  def local(piece):  # piece [..., n / t]; fwht normalises by sqrt(n / t)
    y = fwht(piece, block_size).astype(jnp.float32)
    lead, m = y.shape[:-1], y.shape[-1]
    chunks = y.reshape(*lead, shards, m // shards)
    # chunk c of every shard's piece -> shard c, stacked on a new axis
    gathered = jax.lax.all_to_all(chunks, axis_name, split_axis=len(lead),
                                  concat_axis=len(lead), tiled=False)
    mixed = jnp.tensordot(gathered, h_t, axes=[[len(lead)], [1]],
                          precision=jax.lax.Precision.HIGHEST)
    mixed = jnp.moveaxis(mixed, -1, len(lead))
    back = jax.lax.all_to_all(mixed, axis_name, split_axis=len(lead),
                              concat_axis=len(lead), tiled=False)
    return back.reshape(*lead, m).astype(piece.dtype)

  return jax.shard_map(local, in_specs=spec, out_specs=spec)(x)

