"""fwht against independent float64 numpy Hadamard matrices (Eq. 3-4, 8)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bitnet_jax import hadamard
from bitnet_jax.hadamard import fwht

from np_reference import K_SIZES, ref_fwht, ref_matrix_columns, ref_paley1, ref_paley2


@functools.lru_cache(maxsize=None)
def ref_case(n):
  """A random f32 input of width n and its float64 reference transform."""
  rows = 3 if n > 4096 else 5
  x = np.random.default_rng(n).standard_normal((rows, n)).astype(np.float32)
  return x, ref_fwht(x)


def rel_err(a, b):
  return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


POW2 = [2 ** m for m in range(1, 15)]  # 2 .. 16384
K_POW = [k * p for k in K_SIZES for p in (1, 4)] + [108 * 64]


@pytest.mark.parametrize("kind,q", [("I", 11), ("I", 19), ("II", 13),
                                    ("II", 17), ("I", 43), ("I", 59),
                                    ("I", 107), ("I", 139)])
def test_paley_matrix_equals_reference_and_is_orthogonal(kind, q):
  order = q + 1 if kind == "I" else 2 * (q + 1)
  h = hadamard.paley_matrix(order)
  ref = ref_paley1(q) if kind == "I" else ref_paley2(q)
  np.testing.assert_array_equal(h, ref)
  assert set(np.unique(h)) == {-1, 1}
  np.testing.assert_array_equal(h @ h.T, order * np.eye(order))
  np.testing.assert_array_equal(h, h.T)


@pytest.mark.parametrize("block_size", [2, 8, 64])
@pytest.mark.parametrize("n", POW2 + K_POW)
def test_fwht_matches_dense_float64(n, block_size):
  x, ref = ref_case(n)
  y = fwht(jnp.asarray(x), block_size)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("n", [8, 256, 4096, 12 * 64, 6912])
def test_fwht_is_an_involution_and_isometry(n):
  x = np.random.default_rng(0).standard_normal((4, n)).astype(np.float32)
  y = fwht(jnp.asarray(x))
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1),
                             np.linalg.norm(x, axis=-1), rtol=1e-5)
  assert rel_err(fwht(y), x.astype(np.float64)) <= 1e-5


@pytest.mark.parametrize("n", [16, 1024, 20 * 16])
def test_vjp_is_transposed_hadamard(n):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, n)).astype(np.float32)
  g = rng.standard_normal((2, 3, n)).astype(np.float32)
  _, vjp = jax.vjp(fwht, jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(g))
  # d/dx <g, x H/sqrt(n)> = g H^T / sqrt(n), written with the transpose.
  cols = np.arange(n)
  expected = np.asarray(g, np.float64) @ ref_matrix_columns(n, cols).T / np.sqrt(n)
  assert rel_err(dx, expected) <= 1e-5


@pytest.mark.parametrize("n", [8, 12 * 2])
def test_check_grads(n):
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, n)), jnp.float32)
  check_grads(lambda v: jnp.sin(fwht(v)), (x,), order=2, modes=["rev"],
              atol=2e-2, rtol=2e-2)


def test_jit_vmap_grad_and_leading_shapes():
  n = 64
  x = np.random.default_rng(3).standard_normal((2, 3, 5, n)).astype(np.float32)
  ref = ref_fwht(x)
  assert rel_err(jax.jit(fwht)(jnp.asarray(x)), ref) <= 1e-5
  assert rel_err(jax.vmap(jax.vmap(fwht))(jnp.asarray(x)), ref) <= 1e-5
  assert rel_err(jax.jit(fwht, static_argnums=1)(jnp.asarray(x), 2), ref) <= 1e-5
  grad = jax.grad(lambda v: jnp.sum(fwht(v) * ref.astype(np.float32)))(
      jnp.asarray(x))
  # The gradient of <c, fwht(x)> is fwht^T(c) = H c / sqrt(n) = x (involution).
  assert rel_err(grad, x.astype(np.float64)) <= 1e-5


@pytest.mark.parametrize("n", [16, 1024, 16384, 108 * 64])
def test_bfloat16_error_is_one_rounding(n):
  x = jnp.asarray(np.random.default_rng(4).standard_normal((4, n)), jnp.bfloat16)
  y = fwht(x)
  assert y.dtype == jnp.bfloat16
  ref = ref_fwht(np.asarray(x, np.float32))
  err = np.abs(np.asarray(y, np.float64) - ref)
  # One bf16 rounding (unit roundoff 2^-8) plus f32 arithmetic noise; the bound
  # does not depend on log n.
  assert np.all(err <= 2.0 ** -8 * np.abs(ref) + 1e-5)


def ref_supported(n):
  """Brute force: n = K * 2^k, K = 1 or a Paley order <= 1024 from a prime."""
  def prime(q):
    return q > 1 and all(q % f for f in range(2, int(q ** 0.5) + 1))
  for k in range(1, min(n, 1024) + 1):
    if n % k or (n // k) & (n // k - 1):
      continue
    if k == 1 or (prime(k - 1) and (k - 1) % 4 == 3) or (
        k % 2 == 0 and prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1):
      return True
  return False


@pytest.mark.parametrize("n", [3, 100, 11008, 5000])
def test_unsupported_size_names_neighbours(n):
  assert not ref_supported(n)
  below = next(m for m in range(n - 1, 0, -1) if ref_supported(m))
  above = next(m for m in range(n + 1, 4 * n) if ref_supported(m))
  if n == 100:
    assert (below, above) == (96, 104)
  with pytest.raises(ValueError) as info:
    fwht(jnp.ones((2, n)))
  msg = str(info.value)
  assert str(n) in msg and str(below) in msg and str(above) in msg


@pytest.mark.parametrize("mesh_shape,n", [((2, 4), 256), ((1, 8), 64),
                                          ((4, 2), 128)])
def test_sharded_fwht_equals_the_matrix(mesh_shape, n):
  """The distributed FWHT (feature axis split over 'tensor', batch over
  'data') equals x @ H_n / sqrt(n) in float64, forward and backward, and
  never gathers the feature axis: its only collectives are all-to-alls."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(jax.devices()).reshape(mesh_shape), ("data", "tensor"))
  t = mesh_shape[1]
  rng = np.random.default_rng(n)
  x = rng.normal(size=(4, 3, n)).astype(np.float32)
  w = rng.normal(size=(n,))
  h = hadamard.sylvester_matrix(n).astype(np.float64) / np.sqrt(n)
  f = lambda v: hadamard.fwht_sharded(v, "tensor", t, batch_axes="data")
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None, "tensor")))
    y = jax.jit(f)(xs)
    g = jax.jit(jax.grad(lambda v: jnp.sum(f(v) * w)))(xs)
    text = jax.jit(f).lower(xs).compile().as_text()
  np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ h,
                             atol=2e-6)
  np.testing.assert_allclose(np.asarray(g), np.broadcast_to(h @ w, x.shape),
                             atol=2e-6)
  assert " all-to-all(" in text or "all-to-all-start" in text
  assert " all-gather(" not in text and "all-gather-start" not in text


def test_sharded_fwht_refuses_what_it_cannot_split():
  assert hadamard.shardable(64, 8) and not hadamard.shardable(32, 8)
  assert not hadamard.shardable(96, 2)  # a Paley factor: H_t (x) H_n/t fails
  with pytest.raises(ValueError, match="power of two"):
    hadamard.fwht_sharded(jnp.zeros((2, 96)), "tensor", 2)
