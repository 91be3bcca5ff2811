"""Quantizers against float64 numpy formulas of Eq. 1, 2, 5 and 6."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import quant

from np_reference import np_int4, np_int4_absmax, np_int8, np_ternary


def inputs():
  rng = np.random.default_rng(0)
  gauss = rng.standard_normal((64, 256))
  # Heavy tails: Student-t with 2 degrees of freedom and 4 outlier channels.
  heavy = rng.standard_t(2, size=(64, 256))
  heavy[:, [3, 50, 77, 200]] *= 40.0
  edge = rng.standard_normal((4, 256))
  edge[0] = 0.0                       # all-zero token
  edge[1, 17] = 1e4                   # one huge value
  edge[2] = 1e-3 * edge[2]            # tiny token
  return {"gauss": gauss, "heavy": heavy, "edge": edge}


def assert_levels_equal(codes, ref_codes, pre):
  """Exact levels, except where float32 cannot tell a .5 tie from its neighbour."""
  codes = np.asarray(codes, np.float64)
  near_tie = np.abs(np.abs(pre - np.floor(pre)) - 0.5) < 1e-4
  bad = (codes != ref_codes) & ~near_tie
  assert not bad.any(), f"{bad.sum()} levels differ from the float64 reference"
  assert np.mean(codes != ref_codes) < 1e-3


@pytest.mark.parametrize("name", ["gauss", "heavy", "edge"])
def test_ternary_matches_eq1(name):
  w = inputs()[name].astype(np.float32)
  codes, alpha = quant.ternary_codes(jnp.asarray(w))
  ref_codes, ref_alpha, pre = np_ternary(w)
  assert codes.dtype == jnp.int8
  assert set(np.unique(codes)) <= {-1, 0, 1}
  assert_levels_equal(codes, ref_codes, pre)
  np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-6)
  fake = quant.quantize_weights_ternary(jnp.asarray(w))
  np.testing.assert_array_equal(
      fake, np.asarray(codes, np.float32) * np.float32(alpha))
  np.testing.assert_allclose(fake, ref_codes * ref_alpha, rtol=1e-5, atol=1e-6)


def test_fused_kernel_gets_one_absmean_per_projection():
  """A fused W_qkv [D, K, G + 2, E] (and W_up,gate [D, 2, F]) is quantized as
  if each projection were its own tensor (Eq. 1-2 per projection)."""
  rng = np.random.default_rng(3)
  d, k, g, e = 16, 2, 3, 8
  w = rng.standard_normal((d, k, g + 2, e)).astype(np.float32)
  w[:, :, g + 1] *= 0.3  # a small W_v: a shared scale would zero most of it
  segments = (0,) * g + (1, 2)
  codes, alpha = quant.ternary_codes(jnp.asarray(w), (2, segments))
  fake = quant.quantize_weights_ternary(jnp.asarray(w), (2, segments))
  for proj, cols in ((0, slice(0, g)), (1, slice(g, g + 1)),
                     (2, slice(g + 1, g + 2))):
    ref_codes, ref_alpha, pre = np_ternary(w[:, :, cols])
    assert_levels_equal(np.asarray(codes)[:, :, cols], ref_codes, pre)
    np.testing.assert_allclose(np.asarray(alpha)[proj], ref_alpha, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fake)[:, :, cols],
                               ref_codes * ref_alpha, rtol=1e-5, atol=1e-6)
  # the per-tensor scale would differ: W_v's zero share shows it
  shared, _, _ = np_ternary(w)
  own, _, _ = np_ternary(w[:, :, g + 1])
  assert np.mean(shared[:, :, g + 1] == 0) > np.mean(own == 0) + 0.2
  # the gradient is still the identity (STE)
  grad = jax.grad(lambda v: jnp.sum(quant.quantize_weights_ternary(
      v, (2, segments)) * 3.0))(jnp.asarray(w))
  np.testing.assert_array_equal(grad, 3.0)


ACTIVATION_FORMS = {  # name: (codes, fake quantizer, float64 reference)
    8: (quant.int8_codes, quant.quantize_activations_int8, np_int8),
    4: (quant.int4_codes, quant.quantize_activations_int4, np_int4),
    "4absmax": (quant.int4_absmax_codes, quant.quantize_activations_int4_absmax,
                np_int4_absmax),
}


@pytest.mark.parametrize("name", ["gauss", "heavy", "edge"])
@pytest.mark.parametrize("bits", [8, 4, "4absmax"])
def test_activations_match_eq5_eq6(name, bits):
  x = inputs()[name].astype(np.float32)
  int_form, fake_fn, reference = ACTIVATION_FORMS[bits]
  ref_codes, ref_scale, pre = reference(x)
  codes, scale = int_form(jnp.asarray(x))
  lo, hi = (-128, 127) if bits == 8 else (-8, 7)
  assert codes.dtype == jnp.int8 and scale.shape == (x.shape[0], 1)
  assert codes.min() >= lo and codes.max() <= hi
  assert_levels_equal(codes, ref_codes, pre)
  # Exact clipping: every entry the reference clips sits on the boundary.
  clipped = (pre > hi + 0.5) | (pre < lo - 0.5)
  np.testing.assert_array_equal(np.asarray(codes)[clipped], ref_codes[clipped])
  np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
  fake = fake_fn(jnp.asarray(x))
  np.testing.assert_array_equal(fake, np.asarray(codes, np.float32) * np.asarray(scale))
  np.testing.assert_allclose(fake, ref_codes * ref_scale, rtol=1e-5, atol=1e-7)
  assert np.isfinite(np.asarray(fake)).all()
  dispatch = quant.quantize_activations(
      jnp.asarray(x), 8 if bits == 8 else 4,
      "absmax" if bits == "4absmax" else "absmean")
  np.testing.assert_array_equal(dispatch, fake)


def test_edge_cases():
  x = inputs()["edge"].astype(np.float32)
  for fn in (quant.quantize_activations_int8, quant.quantize_activations_int4):
    y = np.asarray(fn(jnp.asarray(x)))
    np.testing.assert_array_equal(y[0], 0.0)  # all-zero token: zeros, no NaN
  codes8, _ = quant.int8_codes(jnp.asarray(x))
  assert codes8[1, 17] == 127                  # the huge value is the absmax
  assert np.count_nonzero(np.asarray(codes8[1])) == 1
  codes4, _ = quant.int4_codes(jnp.asarray(x))
  assert codes4[1, 17] == 7                    # clipped at the top level
  # Tiny token: the scale follows the token, not epsilon (up to eps / beta).
  tiny_codes, _, _ = np_int4(x[2:3])
  assert np.mean(np.asarray(codes4[2]) == tiny_codes[0]) > 0.99
  w0 = quant.quantize_weights_ternary(jnp.zeros((8, 8)))
  np.testing.assert_array_equal(w0, 0.0)


@pytest.mark.parametrize("bits", [8, 4])
def test_bfloat16_input(bits):
  x = jnp.asarray(inputs()["heavy"], jnp.bfloat16)
  fake_fn = (quant.quantize_activations_int8 if bits == 8 else
             quant.quantize_activations_int4)
  ref_codes, ref_scale, pre = (np_int8 if bits == 8 else np_int4)(
      np.asarray(x, np.float32))
  codes, _ = quant.activation_codes(x, bits)
  assert_levels_equal(codes, ref_codes, pre)
  y = fake_fn(x)
  assert y.dtype == jnp.bfloat16
  ref = ref_codes * ref_scale
  np.testing.assert_allclose(np.asarray(y, np.float64), ref,
                             rtol=2.0 ** -8, atol=1e-30)


@pytest.mark.parametrize("fn", [quant.quantize_weights_ternary,
                                quant.quantize_activations_int8,
                                quant.quantize_activations_int4,
                                quant.quantize_activations_int4_absmax,
                                lambda v: quant.sparsify_topk(v, 0.5)])
def test_gradients_are_identity(fn):
  x = jnp.asarray(inputs()["heavy"][:8], jnp.float32)
  g = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)
  _, vjp = jax.vjp(fn, x)
  np.testing.assert_array_equal(vjp(g)[0], g)
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(fn(v) * g))(x), g)


def test_sparsify_topk_keeps_largest_magnitudes():
  x = np.random.default_rng(6).standard_normal((16, 100)).astype(np.float32)
  y = np.asarray(quant.sparsify_topk(jnp.asarray(x), 0.3))
  for row, out in zip(x, y):
    keep = np.argsort(-np.abs(row))[:30]
    expected = np.zeros_like(row)
    expected[keep] = row[keep]
    np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(quant.sparsify_topk(jnp.asarray(x), 1.0), x)
  # Ties at the threshold are all kept; zeros and negatives order by magnitude.
  tie = jnp.asarray([[3.0, -2.0, 2.0, 0.0, 1.0, -2.0]])
  np.testing.assert_array_equal(quant.sparsify_topk(tie, 0.3),
                                [[3.0, -2.0, 2.0, 0.0, 0.0, -2.0]])
  with pytest.raises(ValueError):
    quant.sparsify_topk(jnp.asarray(x), 0.0)


def test_quantize_activations_dispatch_errors():
  with pytest.raises(ValueError, match="8, 4 or None"):
    quant.quantize_activations(jnp.ones((2, 4)), 3)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_attention_state_quantizer(bits):
  from np_reference import np_heads
  rng = np.random.default_rng(9)
  x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)  # [B, L, heads, E]
  x[0, 0, 1] *= 50.0                                          # a huge head
  x[1, 2, 0] = 0.0                                            # an all-zero head
  codes, scale, gamma = quant.head_codes(jnp.asarray(x), bits)
  ref_codes, ref_scale, ref_gamma, pre = np_heads(x, bits)
  assert codes.dtype == jnp.uint8
  assert int(codes.max()) <= 2 ** bits - 1
  assert_levels_equal(codes, ref_codes, pre)
  np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
  fake = quant.quantize_heads(jnp.asarray(x), bits)
  np.testing.assert_allclose(fake, ref_codes * ref_scale - ref_gamma, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(fake)[1, 2, 0], 0.0)
  # Each head uses at most 2^bits levels, and its extremes are exact.
  per_head = np.asarray(fake).reshape(-1, 16)
  assert max(len(np.unique(h)) for h in per_head) <= 2 ** bits
  g = jax.grad(lambda v: jnp.sum(quant.quantize_heads(v, bits) * 3.0))(jnp.asarray(x))
  np.testing.assert_array_equal(g, 3.0)


def test_bos_keeps_eight_bits():
  from np_reference import np_heads
  x = np.random.default_rng(10).standard_normal((2, 4, 2, 16)).astype(np.float32)
  bos = np.zeros((2, 4), bool)
  bos[:, 0] = True
  y = np.asarray(quant.quantize_heads_keep_bos(jnp.asarray(x), 3, jnp.asarray(bos)))
  c8, s8, g8, _ = np_heads(x, 8)
  c3, s3, g3, _ = np_heads(x, 3)
  np.testing.assert_allclose(y[:, 0], (c8 * s8 - g8)[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y[:, 1:], (c3 * s3 - g3)[:, 1:], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(
      quant.quantize_heads_keep_bos(jnp.asarray(x), None, jnp.asarray(bos)), x)
