"""Mean-centred H-BitLinear (quant.mean_centre): the layer against a float64
formula, its offsets' calibration against a numpy Hadamard of the sown
pre-rotation inputs, and the a8 -> a4 continuation of a parent saved without
offsets."""
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.data.batch import Batch
from bitnet_jax import quant
from bitnet_jax.errors import ConfigError
from bitnet_jax.layers import BitLinear, QuantConfig
from bitnet_jax.model import ModelConfig, Transformer
from bitnet_jax.training import centring

from np_reference import np_hadamard, np_int4, np_rmsnorm, np_ternary
from conftest import small_run_config

D_IN, D_OUT = 64, 24
H = np_hadamard(D_IN)


def layer(weights="latent", centre=True):
  return BitLinear(D_OUT, ("mlp", "embed"), rotation="activation",
                   centre=centre, quant=QuantConfig(act_bits=4, weights=weights))


def offset_inputs(seed=0, tokens=40, channel=5, size=4.0):
  """Tokens whose normalised, rotated form shares an offset along one Walsh
  channel (x = noise + size * row `channel` of H)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, tokens // 2, D_IN)) + size * H[channel]
  return jnp.asarray(x, jnp.float32)


def latent_params(x, mu):
  p = nn.meta.unbox(layer().init(jax.random.PRNGKey(1), x)["params"])
  p["norm"]["scale"] = jnp.linspace(0.5, 1.5, D_IN)
  p["offset"] = jnp.asarray(mu, jnp.float32)
  return p


def np_centred(x, p):
  """Q_int4(H x - mu) . Q_w(W) + mu . Q_w(W) in float64 (Eq. 1-2, 6, 7)."""
  z = np_rmsnorm(x, p["norm"]["scale"], 1e-6) @ H
  mu = np.asarray(p["offset"], np.float64)
  codes, step, _ = np_int4(z - mu)
  w_codes, alpha, _ = np_ternary(p["kernel"])
  w = w_codes * alpha
  return (codes * step) @ w + mu @ w


def rotated(x, p):
  return np_rmsnorm(x, p["norm"]["scale"], 1e-6) @ H


def test_centred_layer_is_the_float64_formula():
  x = offset_inputs()
  p = latent_params(x, np.zeros(D_IN))
  p["offset"] = jnp.asarray(rotated(x, p).reshape(-1, D_IN).mean(0), jnp.float32)
  y = layer().apply({"params": p}, x)
  np.testing.assert_allclose(y, np_centred(x, p), rtol=1e-4, atol=1e-4)


def test_zero_offset_is_plain_h_bitlinear_and_mu_gets_no_gradient():
  x = offset_inputs(1)
  p = latent_params(x, np.zeros(D_IN))
  plain = {k: v for k, v in p.items() if k != "offset"}
  np.testing.assert_array_equal(layer().apply({"params": p}, x),
                                layer(centre=False).apply({"params": plain}, x))
  p["offset"] = jnp.ones(D_IN)
  grads = jax.grad(lambda q: jnp.sum(layer().apply({"params": q}, x) ** 2))(p)
  assert not np.any(np.asarray(grads["offset"]))
  assert np.abs(np.asarray(grads["kernel"])).max() > 0


def test_centring_removes_the_int4_error_of_a_shared_offset():
  """The audit's finding in small: a Walsh channel carrying a token-shared
  offset is clipped by absmean INT4; centring it out cuts the error."""
  x = offset_inputs(2, size=6.0)
  p = latent_params(x, np.zeros(D_IN))
  z = rotated(x, p)
  w_codes, alpha, _ = np_ternary(p["kernel"])
  exact = z @ (w_codes * alpha)
  plain_err = np.abs(layer().apply({"params": p}, x) - exact).mean()
  p["offset"] = jnp.asarray(z.reshape(-1, D_IN).mean(0), jnp.float32)
  centred_err = np.abs(layer().apply({"params": p}, x) - exact).mean()
  assert centred_err < 0.6 * plain_err, (centred_err, plain_err)


@pytest.mark.parametrize("weights", ["int8", "packed"])
def test_exported_forms_add_the_same_bias(weights):
  from bitnet_jax import packing
  x = offset_inputs(3)
  p = latent_params(x, np.zeros(D_IN))
  p["offset"] = jnp.asarray(rotated(x, p).reshape(-1, D_IN).mean(0), jnp.float32)
  codes, scale = quant.ternary_codes(p["kernel"])
  exported = {"norm": p["norm"], "offset": p["offset"], "scale": scale}
  if weights == "packed":
    exported["packed"] = jnp.asarray(packing.pack_ternary(np.asarray(codes)))
  else:
    exported["codes"] = codes
  y = layer(weights).apply({"params": exported}, x)
  np.testing.assert_allclose(y, np_centred(x, p), rtol=1e-4, atol=1e-4)


def small_model(scan: bool):
  cfg = ModelConfig(vocab_size=64, d_model=64, d_ff=128, num_heads=2,
                    num_layers=2, seq_len=16, mean_centre=True,
                    scan_layers=scan)
  return Transformer(cfg)


@pytest.mark.parametrize("scan", [True, False])
def test_calibration_is_the_mean_of_the_rotated_inputs(scan):
  model = small_model(scan)
  rng = np.random.default_rng(0)
  batches = [Batch(jnp.asarray(rng.integers(0, 64, (4, 17)), jnp.int32))
             for _ in range(2)]
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0),
                                    batches[0].inputs)["params"])
  assert centring.needs_calibration(params)
  calibrated, sizes = centring.calibrate(params, model, batches)
  sites = 2 if scan else 4  # W_o, W_down (per layer when unrolled)
  assert not centring.needs_calibration(calibrated) and len(sizes) == sites
  # reference: mean over both batches of the sown pre-rotation input times H
  pre = {}
  for b in batches:
    _, state = model.apply({"params": params}, b.inputs,
                           mutable=["intermediates"])
    for path, v in jax.tree_util.tree_flatten_with_path(state)[0]:
      keys = [k.key for k in path if hasattr(k, "key")]
      if keys[-1] == "pre_rotation":
        pre.setdefault(tuple(keys[1:-1]), []).append(np.asarray(v, np.float64))
  offsets = centring.offset_leaves(calibrated)
  assert len(pre) == len(offsets) == sites
  for site, values in pre.items():
    width = values[0].shape[-1]
    h = np_hadamard(width)
    # scanned: [layers, B, L, in]; unrolled: [B, L, in]
    means = [(v @ h).reshape(*v.shape[:-3], -1, width).mean(-2) for v in values]
    np.testing.assert_allclose(offsets[site + ("offset",)], np.mean(means, 0),
                               rtol=1e-4, atol=1e-5)


def test_mean_centre_needs_v2_with_a_hadamard():
  for changes in ({"variant": "b1.58"}, {"hadamard": "none"}):
    with pytest.raises(ConfigError, match="mean_centre"):
      ModelConfig(vocab_size=64, d_model=64, d_ff=128, num_heads=2,
                  num_layers=1, seq_len=16, mean_centre=True, **changes)


@pytest.mark.slow
def test_a4_continuation_of_an_uncentred_parent(tmp_path, corpus_file,
                                                trained_run, caplog):
  """init_from a v2 (a8) run saved without offsets: the state is restored as
  the uncentred model's, offsets are calibrated at the first 4-bit step, and
  the data stream is the one the uncentred a4 run sees."""
  from bitnet_jax.training import trainer
  from test_train import losses, saved_state
  caplog.set_level(logging.INFO)
  runs = {}
  for centre in (False, True):
    config = small_run_config(corpus_file, **{
        "quant.act_bits": 4, "quant.mean_centre": centre,
        "train.stop_step": 26, "train.ckpt_every": 2})
    config.init_from = trained_run
    workdir = str(tmp_path / f"centre{int(centre)}")
    summary = trainer.train(config, workdir)
    assert summary["origin"] == "init_from" and summary["start_step"] == 24
    runs[centre] = workdir
  raw = saved_state(runs[True], 26)
  offsets = centring.offset_leaves(raw["params"])
  assert len(offsets) == 2 and all(np.abs(v).max() > 0 for v in offsets.values())
  plain = saved_state(runs[False], 26)
  assert plain["step"] == raw["step"] == 26
  # same batches: the data iterator states saved at step 26 agree
  data = [open(os.path.join(w, "checkpoints", "26", "data", name)).read()
          for w in runs.values()
          for name in sorted(os.listdir(os.path.join(w, "checkpoints", "26",
                                                     "data")))
          if name.endswith(".json")]
  assert data
  assert data[: len(data) // 2] == data[len(data) // 2:]
  for w in runs.values():
    assert all(np.isfinite(r["loss"]) for r in losses(w).values())
  assert "step 24: calibrated 2 mean-centring offsets" in caplog.text


@pytest.mark.slow
def test_offsets_are_calibrated_where_a_run_switches_to_4_bits(tmp_path,
                                                              corpus_file):
  from bitnet_jax.training import trainer
  from test_train import losses, saved_state
  config = small_run_config(corpus_file, **{
      "quant.mean_centre": True, "quant.a4_start_step": 8,
      "train.stop_step": 10, "train.ckpt_every": 4})
  trainer.train(config, str(tmp_path))
  assert [losses(str(tmp_path))[s]["act_bits"] for s in (8, 9)] == [8, 4]
  at8 = centring.offset_leaves(saved_state(str(tmp_path), 8)["params"])
  at10 = centring.offset_leaves(saved_state(str(tmp_path), 10)["params"])
  assert len(at8) == len(at10) == 2
  assert not any(np.any(v) for v in at8.values())     # zero while at 8 bits
  assert all(np.abs(v).max() > 0 for v in at10.values())


def test_export_keeps_the_offsets():
  """A centred model exported to integer codes computes the latent model's
  logits (the offsets travel with the norms)."""
  from bitnet_jax.inference import exported
  model = small_model(scan=True)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 16)))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
  params, _ = centring.calibrate(params, model,
                                 [Batch(jnp.pad(tokens, ((0, 0), (0, 1))))])
  want = model.apply({"params": params}, tokens)
  out = exported.inference_params(params, model.cfg, "int8", "float32")
  assert set(centring.offset_leaves(out)) == set(centring.offset_leaves(params))
  got = Transformer(model.cfg.replace(weights="int8")).apply({"params": out},
                                                            tokens)
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
