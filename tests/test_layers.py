"""Layers against their compositions written out by hand."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import quant
from bitnet_jax.hadamard import fwht
from bitnet_jax.layers import BitLinear, Linear, QuantConfig, RMSNorm

from np_reference import np_rmsnorm

D_IN, D_OUT = 64, 48


def setup(module, x):
  variables = module.init(jax.random.PRNGKey(0), x)
  params = nn.meta.unbox(variables["params"])
  # Give the norm a non-trivial scale so its wiring is visible.
  if "norm" in params:
    params["norm"]["scale"] = jnp.linspace(0.5, 1.5, x.shape[-1])
  return params


def data(seed=0, shape=(2, 5, D_IN)):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 3,
                     jnp.float32)


def test_rmsnorm_formula():
  x = data()
  mod = RMSNorm(eps=1e-5)
  params = setup(mod, x)
  params["scale"] = jnp.linspace(0.1, 2.0, D_IN)
  y = mod.apply({"params": params}, x)
  np.testing.assert_allclose(y, np_rmsnorm(x, params["scale"], 1e-5), rtol=1e-5)


def test_bitlinear_without_quantization_is_rmsnorm_matmul():
  x = data()
  mod = BitLinear(D_OUT, ("embed", "mlp"), quant=QuantConfig.off(), norm_eps=1e-6)
  p = setup(mod, x)
  y = mod.apply({"params": p}, x)
  ref = np_rmsnorm(x, p["norm"]["scale"], 1e-6) @ np.asarray(p["kernel"], np.float64)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_bitlinear_composition(bits):
  x = data(1)
  mod = BitLinear(D_OUT, ("embed", "mlp"), quant=QuantConfig(act_bits=bits))
  p = setup(mod, x)
  y = mod.apply({"params": p}, x)
  h = RMSNorm(1e-6).apply({"params": {"scale": p["norm"]["scale"]}}, x)
  hq = (quant.quantize_activations_int8 if bits == 8 else
        quant.quantize_activations_int4)(h)
  ref = hq @ quant.quantize_weights_ternary(p["kernel"])
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # Activations really are quantized: <= 2^bits levels per token.
  levels = [len(np.unique(np.asarray(t))) for t in np.asarray(hq).reshape(-1, D_IN)]
  assert max(levels) <= 2 ** bits


@pytest.mark.parametrize("bits", [8, 4])
def test_hbitlinear_is_eq7(bits):
  x = data(2)
  mod = BitLinear(D_OUT, ("mlp", "embed"), quant=QuantConfig(act_bits=bits),
                  rotation="activation")
  p = setup(mod, x)
  y = mod.apply({"params": p}, x)
  h = fwht(RMSNorm(1e-6).apply({"params": {"scale": p["norm"]["scale"]}}, x))
  hq = quant.quantize_activations(h, bits)
  ref = hq @ quant.quantize_weights_ternary(p["kernel"])
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # ... and it is not the unrotated BitLinear.
  plain = BitLinear(D_OUT, ("mlp", "embed"), quant=QuantConfig(act_bits=bits))
  assert np.abs(plain.apply({"params": p}, x) - y).max() > 1e-2


def test_weight_and_activation_rotation_cancels_without_quantization():
  x = data(3)
  mod = BitLinear(D_OUT, ("mlp", "embed"), quant=QuantConfig.off(),
                  rotation="weight_and_activation")
  p = setup(mod, x)
  y = mod.apply({"params": p}, x)
  ref = np_rmsnorm(x, p["norm"]["scale"], 1e-6) @ np.asarray(p["kernel"], np.float64)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  # With quantization the weight absmean is taken of the rotated weight.
  qmod = mod.clone(quant=QuantConfig(act_bits=8))
  h = fwht(RMSNorm(1e-6).apply({"params": {"scale": p["norm"]["scale"]}}, x))
  w_rot = fwht(p["kernel"].T).T
  ref_q = quant.quantize_activations_int8(h) @ quant.quantize_weights_ternary(w_rot)
  np.testing.assert_allclose(qmod.apply({"params": p}, x), ref_q, rtol=1e-5,
                             atol=1e-5)


def test_multi_axis_output_and_topk():
  x = data(4)
  q = QuantConfig(act_bits=8, topk_ratio=0.5)
  mod = BitLinear((3, 16), ("embed", None, "mlp"), quant=q)
  p = setup(mod, x)
  y = mod.apply({"params": p}, x)
  assert y.shape == (2, 5, 3, 16)
  h = RMSNorm(1e-6).apply({"params": {"scale": p["norm"]["scale"]}}, x)
  hq = quant.quantize_activations_int8(quant.sparsify_topk(h, 0.5))
  assert (np.count_nonzero(np.asarray(hq), -1) <= D_IN // 2).all()
  w = quant.quantize_weights_ternary(p["kernel"]).reshape(D_IN, -1)
  np.testing.assert_allclose(y.reshape(2, 5, -1), hq @ w, rtol=1e-5, atol=1e-5)


def test_linear_is_a_plain_matmul_and_bf16_compute():
  x = data(5)
  mod = Linear(D_OUT, ("embed", "mlp"))
  p = setup(mod, x)
  np.testing.assert_allclose(mod.apply({"params": p}, x),
                             np.asarray(x, np.float64) @ np.asarray(p["kernel"]),
                             rtol=1e-4, atol=1e-5)
  bf = BitLinear(D_OUT, ("embed", "mlp"), dtype=jnp.bfloat16)
  pb = setup(bf, x)
  yb = bf.apply({"params": pb}, x)
  yf = bf.clone(dtype=jnp.float32).apply({"params": pb}, x)
  assert yb.dtype == jnp.bfloat16
  assert np.linalg.norm(np.asarray(yb, np.float32) - yf) / np.linalg.norm(yf) < 2e-2


def test_params_carry_logical_axes_and_stay_float32():
  x = data(6)
  mod = BitLinear(D_OUT, ("embed", "mlp"), dtype=jnp.bfloat16)
  boxed = mod.init(jax.random.PRNGKey(0), x)["params"]
  assert boxed["kernel"].names == ("embed", "mlp")
  assert boxed["norm"]["scale"].names == ("embed",)
  assert nn.meta.unbox(boxed)["kernel"].dtype == jnp.float32


def test_bad_layer_options():
  x = data(7)
  with pytest.raises(ValueError, match="latent weights"):
    BitLinear(D_OUT, ("mlp", "embed"), rotation="learned",
              quant=QuantConfig(weights="int8")).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="rotation must be one of"):
    BitLinear(D_OUT, ("mlp", "embed"), rotation="weights").init(
        jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="act_bits"):
    QuantConfig(act_bits=2)
  with pytest.raises(ValueError, match="kernel_axes"):
    BitLinear(D_OUT, ("embed",)).init(jax.random.PRNGKey(0), x)
