"""The fused H-BitLinear input kernels (kernels/h_input.py: the TPU one,
"interpret", and the GPU one, "triton_interpret") on CPU through Pallas'
interpreter, against float64 numpy formulas of the paper's
equations (RMSNorm, Eq. 3-4 Hadamard, Eq. 5 absmax INT8, Eq. 6 absmean
INT4) and against the jnp stages of layers.BitLinear; its backward against
the float64 derivative (Eq. 8: the Hadamard of the gradient, then the
RMSNorm backward)."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from bitnet_jax import hadamard, quant
from bitnet_jax.kernels import h_input, row_math
from bitnet_jax.layers import BitLinear, QuantConfig, RMSNorm

EPS_NORM = 1e-5


def hadamard64(n: int) -> np.ndarray:
  """H_n / sqrt(n) in float64, from the identity through fwht's definition
  (a dense matrix, not the kernel's Kronecker factors)."""
  return np.asarray(hadamard.fwht(jnp.eye(n, dtype=jnp.float32)),
                    np.float64)


def reference(x, s, bits):
  """(levels before rounding, codes, scales) in float64."""
  x = np.asarray(x, np.float64)
  y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS_NORM) * s
  z = y @ hadamard64(x.shape[-1])
  if bits == 8:
    stat = np.abs(z).max(-1, keepdims=True)
    level, lo, hi = 127.0, -128, 127
  else:
    stat = np.abs(z).mean(-1, keepdims=True)
    level, lo, hi = np.sqrt(7.0), -8, 7
  v = z * level / (stat + quant.EPS)
  return v, np.clip(np.round(v), lo, hi), stat / level


def inputs(rows, n, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, n)) * rng.uniform(0.5, 4, (rows, 1))
  x[:, :3] *= 20  # outlier channels, what the rotation is for
  s = 1 + 0.2 * rng.standard_normal(n)
  return jnp.asarray(x, dtype), jnp.asarray(s, jnp.float32)


def near_boundary(v, lo, hi, tol):
  """Reference levels within tol of a rounding boundary (inside the clip)."""
  frac = np.abs(np.abs(v) % 1.0 - 0.5)
  return (frac < tol) & (v > lo - 0.5) & (v < hi + 0.5)


def test_rounding_is_half_to_even():
  v = jnp.asarray([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5, -127.5, 0.49999997,
                   -0.50000006, 3.2, -3.7, 0.0])
  np.testing.assert_array_equal(row_math.round_half_even(v), np.round(v))
  r = jax.random.uniform(jax.random.PRNGKey(0), (4096,), minval=-130,
                         maxval=130)
  np.testing.assert_array_equal(row_math.round_half_even(r), np.round(r))


# the TPU kernel's body (Mosaic) and the GPU kernel's (Triton), interpreted
IMPLS = ("interpret", "triton_interpret")


@pytest.mark.parametrize("impl,n,bits,dtype", [
    (impl, n, bits, dtype) for impl in IMPLS for n in (256, 12 * 64)
    for bits in (8, 4) for dtype in (jnp.float32, jnp.bfloat16)
    if h_input.supported(n, impl)] + [
    (impl, 4096, bits, dtype) for impl in IMPLS
    for bits, dtype in ((8, jnp.bfloat16), (4, jnp.float32))])
def test_codes_and_scales_match_the_float64_reference(impl, n, bits, dtype):
  rows = 24 if n == 4096 else 40  # not a multiple of the row block: padding
  x, s = inputs(rows, n, dtype)
  codes, scales = h_input.quantized_input(x, s, bits=bits, eps=EPS_NORM,
                                          impl=impl)
  assert codes.dtype == jnp.int8 and codes.shape == (rows, n)
  assert scales.dtype == jnp.float32 and scales.shape == (rows, 1)
  v, want, want_scale = reference(np.asarray(x, np.float64), np.asarray(s),
                                  bits)
  np.testing.assert_allclose(np.asarray(scales), want_scale, rtol=2e-5)
  lo, hi = (-128, 127) if bits == 8 else (-8, 7)
  differ = np.asarray(codes) != want
  # the kernel's 16- or 24-bit Hadamard moves a level by <= 2^-16: only
  # codes whose float64 level is that close to a boundary may round the
  # other way
  assert np.all(near_boundary(v, lo, hi, 1e-4 + 1e-4 * np.abs(v))[differ])
  assert np.all(np.abs(np.asarray(codes, np.int32) - want)[differ] == 1)
  assert differ.sum() <= max(2, 1e-3 * differ.size)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_codes_match_the_jnp_stages(impl, bits, dtype):
  """The jnp path rounds the norm's output and the rotation's to the
  compute dtype; codes differ only where that rounding crosses a level."""
  n = 1024
  x, s = inputs(32, n, dtype, seed=1)
  codes, scales = h_input.quantized_input(x, s, bits=bits, eps=EPS_NORM,
                                          impl=impl)
  norm = RMSNorm(EPS_NORM)
  y = norm.apply({"params": {"scale": s}}, x)
  jnp_codes, jnp_scales = quant.activation_codes(hadamard.fwht(y), bits)
  differ = np.asarray(codes) != np.asarray(jnp_codes)
  gap = np.abs(np.asarray(codes, np.int32) - np.asarray(jnp_codes, np.int32))
  if dtype == jnp.float32:
    assert differ.sum() <= max(2, 1e-3 * differ.size)
    np.testing.assert_allclose(scales, jnp_scales, rtol=2e-5)
  else:  # bf16 keeps 8 bits of mantissa: ~2^-9 of a level's value, which
    # at 127 levels is a quarter of a level: many codes flip, the kernel's
    # being the exact ones (it rounds once, from f32)
    assert differ.mean() < (0.15 if bits == 8 else 0.05), differ.mean()
    _, want, _ = reference(np.asarray(x, np.float64), np.asarray(s), bits)
    assert (np.asarray(codes) != want).sum() < (
        np.asarray(jnp_codes) != want).sum()
    np.testing.assert_allclose(scales, jnp_scales, rtol=1e-2)
  assert gap.max() <= 1


@pytest.mark.parametrize("impl,n", [("interpret", 256), ("interpret", 12 * 64),
                                    ("triton_interpret", 256),
                                    ("triton_interpret", 4096)])
def test_backward_is_the_hadamard_then_the_rmsnorm_derivative(impl, n):
  """Eq. 8 with the norm: dx = d/dx <H RMSNorm(x; s), dz>, ds likewise, in
  float64 by the closed form, and equal to jax.grad of the jnp stages."""
  x, s = inputs(40, n, jnp.float32, seed=2)
  dz = jnp.asarray(np.random.default_rng(3).standard_normal((40, n)),
                   jnp.float32)
  dx, ds = h_input.input_grads(x, s, dz, eps=EPS_NORM, impl=impl)
  x64, s64, dz64 = (np.asarray(a, np.float64) for a in (x, s, dz))
  inv = 1 / np.sqrt(np.mean(x64 * x64, -1, keepdims=True) + EPS_NORM)
  y_hat = x64 * inv
  dy = dz64 @ hadamard64(n)  # H^T = H
  want_dx = inv * (dy * s64 - y_hat * np.mean(dy * s64 * y_hat, -1,
                                             keepdims=True))
  tol = dict(rtol=1e-4, atol=1e-5 * np.abs(want_dx).max())
  np.testing.assert_allclose(dx, want_dx, **tol)
  want_ds = np.sum(dy * y_hat, 0)
  np.testing.assert_allclose(ds, want_ds, rtol=1e-4,
                             atol=1e-5 * np.abs(want_ds).max())

  def stages(x, s):
    y = RMSNorm(EPS_NORM).apply({"params": {"scale": s}}, x)
    return jnp.sum(hadamard.fwht(y) * dz)
  gx, gs = jax.grad(stages, (0, 1))(x, s)
  np.testing.assert_allclose(dx, gx, **tol)
  np.testing.assert_allclose(ds, gs, rtol=1e-4,
                             atol=1e-5 * np.abs(want_ds).max())


@pytest.mark.parametrize("impl,bits", [("interpret", 8), ("interpret", 4),
                                       ("triton_interpret", 8)])
def test_the_layer_with_the_kernel_is_the_layer_with_stages(impl, bits):
  """BitLinear (v2 H-BitLinear, integer matmul): the fused kernel and the jnp
  stages give the same output, loss gradient and parameter gradients in
  float32 (the straight-through backward of Eq. 8 through both)."""
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 256)) * 3
  out = {}
  for kernel in ("jnp", impl):
    layer = BitLinear(features=128, kernel_axes=("mlp", "embed"),
                      rotation="activation", norm_eps=EPS_NORM,
                      quant=QuantConfig(act_bits=bits, matmul="int8",
                                        input_kernel=kernel))
    params = layer.init(jax.random.PRNGKey(0), x)

    def loss(p, x):
      return jnp.sum(layer.apply(p, x) ** 2)
    out[kernel] = jax.value_and_grad(loss, (0, 1))(params, x)
  (l_ref, g_ref), (l_k, g_k) = out["jnp"], out[impl]
  np.testing.assert_allclose(l_k, l_ref, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())


def test_the_kernel_applies_only_where_it_computes_the_same_stages():
  x = jnp.ones((2, 4, 256))
  base = dict(features=8, kernel_axes=("mlp", "embed"), rotation="activation")
  cases = {
      "int8 matmul, Hadamard": (QuantConfig(matmul="int8",
                                            input_kernel="interpret"), {}),
      "float matmul": (QuantConfig(input_kernel="interpret"), {}),
      "centred": (QuantConfig(matmul="int8", input_kernel="interpret"),
                  {"centre": True}),
      "top-K": (QuantConfig(matmul="int8", topk_ratio=0.5,
                            input_kernel="interpret"), {}),
      "no rotation": (QuantConfig(matmul="int8", input_kernel="interpret"),
                      {"rotation": "none"}),
  }
  used = {}
  for name, (q, extra) in cases.items():
    layer = BitLinear(quant=q, **dict(base, **extra))
    params = layer.init(jax.random.PRNGKey(0), x)
    used[name] = "pallas_call" in str(jax.make_jaxpr(layer.apply)(params, x))
  assert used == {"int8 matmul, Hadamard": True, "float matmul": False,
                  "centred": False, "top-K": False, "no rotation": False}
  # the GPU kernel takes powers of two (a Paley width takes the stages)
  for width, want in ((256, True), (12 * 32, False)):
    x = jnp.ones((2, 4, width))
    layer = BitLinear(quant=QuantConfig(matmul="int8",
                                        input_kernel="triton_interpret"),
                      **base)
    params = layer.init(jax.random.PRNGKey(0), x)
    assert ("pallas_call" in str(jax.make_jaxpr(layer.apply)(params, x))
            ) == want, width
  with pytest.raises(ValueError, match="input_kernel must be"):
    QuantConfig(input_kernel="cuda")


def test_splash_attention_is_xla_attention():
  """kernels/splash.py through Pallas' interpreter: causal, GQA (4 query
  heads on 2 KV heads, the model's head order), packed documents as
  segment ids; the outputs and all three gradients equal XLA's attention
  with the same mask."""
  from bitnet_jax.kernels import splash
  rng = np.random.default_rng(0)
  b, l, h, kh, e = 1, 256, 4, 2, 64
  q, k, v = (jnp.asarray(rng.standard_normal((b, l, n, e)), jnp.float32)
             for n in (h, kh, kh))
  seg = jnp.asarray([[1] * 100 + [2] * 156], jnp.int32)
  mask = seg[:, None, :, None] == seg[:, None, None, :]

  def ours(q, k, v):
    return splash.attention(q, k, v, seg, block=128, interpret=True)

  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
  np.testing.assert_allclose(ours(q, k, v), xla(q, k, v), atol=2e-6)
  g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) ** 2), (0, 1, 2))(q, k, v)
  g_xla = jax.grad(lambda *a: jnp.sum(xla(*a) ** 2), (0, 1, 2))(q, k, v)
  for a, c in zip(g_ours, g_xla):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)
  assert splash.block_size(2048) == 512 and splash.block_size(384) == 384
  assert splash.block_size(640, 256) == 128 and not splash.applies(100)
