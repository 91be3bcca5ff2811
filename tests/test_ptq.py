"""Post-training rotation baselines (QuaRot, SpinQuant; Table 4)."""
import functools
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import subprocess_env
from bitnet_jax import rotations
from bitnet_jax.baselines import rotation_ptq as ptq
from bitnet_jax.layers import BitLinear, QuantConfig
from bitnet_jax.model import ModelConfig, Transformer
from np_reference import np_int4_absmax, np_rmsnorm, np_ternary, ref_fwht

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=64, d_model=32, d_ff=64, num_heads=2, num_layers=2,
            seq_len=16, variant="b1.58")


def random_orthogonal(rng, n, batch=()):
  q, r = np.linalg.qr(rng.standard_normal((*batch, n, n)))
  return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def relative_error(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) /
               np.max(np.abs(np.asarray(b))))


def test_hadamard_rotation_is_diag_signs_times_h():
  signs = rotations.random_signs(jax.random.PRNGKey(3), 32)
  assert set(np.unique(signs)) == {-1.0, 1.0}
  ref = np.diag(np.asarray(signs, np.float64)) @ ref_fwht(np.eye(32))
  r = rotations.hadamard_matrix(signs, 8)
  np.testing.assert_allclose(r, ref, atol=1e-6)
  np.testing.assert_allclose(np.asarray(r).T @ np.asarray(r), np.eye(32),
                             atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_rotated_layer_matches_float64_formula(fused):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 16)) * np.exp(rng.standard_normal(16))
  w = rng.standard_normal((16, 8)) * 0.1
  r = random_orthogonal(rng, 16)
  layer = BitLinear(
      features=8, kernel_axes=("embed", "mlp"), rotation="learned", fused=fused,
      quant=QuantConfig(act_bits=4, int4_scale="absmax"), norm_eps=1e-5)
  stored = (r.T @ w) if fused else w
  params = {"kernel": jnp.asarray(stored, jnp.float32),
            "rotation": jnp.asarray(r, jnp.float32),
            "norm": {"scale": jnp.asarray(1 + 0.1 * rng.standard_normal(16),
                                          jnp.float32)}}
  y = layer.apply({"params": params}, jnp.asarray(x, jnp.float32))
  h = np_rmsnorm(x, params["norm"]["scale"], 1e-5) @ r
  codes, scale, _ = np_int4_absmax(h)
  xq = codes * scale
  if fused:           # Q_x(x R) Q_w(R^T W)
    wc, alpha, _ = np_ternary(r.T @ w)
    ref = xq @ (wc * alpha)
  else:               # Q_x(x R) R^T Q_w(W): W16A4
    wc, alpha, _ = np_ternary(w)
    ref = xq @ r.T @ (wc * alpha)
  np.testing.assert_allclose(y, ref, rtol=2e-4, atol=2e-4)


@functools.lru_cache(maxsize=None)
def tiny_model(scan):
  """(config, tokens, random-init params) of a tiny b1.58 model."""
  base = ModelConfig(**TINY, scan_layers=scan)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 64)
  params = nn.meta.unbox(
      jax.jit(Transformer(base).init)(jax.random.PRNGKey(0), tokens)["params"])
  return base, tokens, params


@pytest.mark.parametrize("method,fused,scan", [
    ("quarot", True, True), ("quarot", False, False),
    ("spinquant", True, False), ("spinquant", False, True)])
def test_rotated_model_equals_original_without_quantization(method, fused, scan):
  base, tokens, params = tiny_model(scan)
  cfg = ptq.ptq_config(base, method, fused)
  rotations = ptq.quarot_signs(cfg, seed=5)
  if method == "spinquant":  # any orthogonal R, not only a Hadamard one
    rng = np.random.default_rng(0)
    rotations = {path: jnp.asarray(random_orthogonal(rng, s.shape[-1],
                                                     s.shape[:-1]), jnp.float32)
                 for path, s in rotations.items()}
  rotated = ptq.rotate_params(params, cfg, rotations)
  run = lambda c, p: jax.jit(Transformer(c).apply)({"params": p}, tokens)
  want = run(base.replace(quantized=False), params)
  got = run(cfg.replace(quantized=False), rotated)
  assert relative_error(got, want) <= 1e-4
  # With quantization the rotation does change the function.
  quantized = run(cfg, rotated)
  assert np.isfinite(np.asarray(quantized)).all()
  assert relative_error(quantized, want) > 1e-3


def test_cayley_step_stays_orthogonal_and_descends():
  rng = np.random.default_rng(1)
  r = jnp.asarray(random_orthogonal(rng, 24, (2,)), jnp.float32)
  target = jnp.asarray(random_orthogonal(rng, 24, (2,)), jnp.float32)
  loss = lambda m: jnp.sum((m - target) ** 2)
  start = float(loss(r))
  for _ in range(50):
    r = ptq.cayley_step(r, jax.grad(loss)(r), 0.05)
  assert ptq.orthogonality_error(r) <= 1e-4
  rn = np.asarray(r, np.float64)
  assert np.max(np.abs(rn.swapaxes(-1, -2) @ rn - np.eye(24))) <= 1e-5
  assert float(loss(r)) < 0.5 * start


def test_ptq_refuses_non_b158_runs():
  with pytest.raises(ValueError, match="b1.58"):
    ptq.ptq_config(ModelConfig(**dict(TINY, variant="v2")), "quarot", True)
  with pytest.raises(ValueError, match="method"):
    ptq.ptq_config(ModelConfig(**TINY), "gptq", True)
  with pytest.raises(ValueError, match="ptq_rotation"):
    ModelConfig(**dict(TINY, variant="v2"), ptq_rotation="learned")


@pytest.mark.slow
def test_spinquant_learns_and_its_run_scores(b158_run, tmp_path):
  from bitnet_jax.data import corpus
  from bitnet_jax.inference import pretrained
  from bitnet_jax.evaluation.perplexity import perplexity
  pre = pretrained.load(b158_run)
  docs = corpus.load_corpus(pre.run.data).train
  rows = ptq.calibration_rows(pre.tokenizer, docs, 32, pre.model_cfg.seq_len)
  assert rows.shape == (32, pre.model_cfg.seq_len + 1)
  cfg, params, info = ptq.quantize(pre, "spinquant", True, calib_rows=rows,
                                   steps=5, lr=1.5, batch=32)
  assert info["orthogonality_error"] <= 1e-4
  assert info["calib_loss_end"] < info["calib_loss_start"]
  # Saved and restored through the evaluation tools' loader: same model.
  out = str(tmp_path / "spin")
  ptq.write_run(pre, out, cfg, params, info)
  loaded = pretrained.load(out)
  assert loaded.model_cfg.ptq_rotation == "learned"
  assert loaded.model_cfg.act_bits == 4 and loaded.step == pre.step
  loss = ptq.mean_loss(
      lambda _, chunk: jnp.mean(-loaded.scorer(loaded.params, chunk)[0]),
      None, rows, 8)
  assert math.isclose(loss, info["calib_loss_end"], rel_tol=1e-4)
  ppl = perplexity(loaded, corpus.load_corpus(pre.run.data).eval[:8])
  assert np.isfinite(ppl["ppl"]) and ppl["ppl"] > 1


@pytest.mark.slow
def test_quarot_cli_end_to_end(b158_run, trained_run, tmp_path):
  out = str(tmp_path / "quarot")
  cmd = [sys.executable, "-m", "bitnet_jax.ptq", "--method=quarot",
         f"--workdir={b158_run}", f"--out={out}"]
  env = subprocess_env()
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  from bitnet_jax.data import corpus
  from bitnet_jax.inference import pretrained
  from bitnet_jax.evaluation.perplexity import perplexity
  loaded = pretrained.load(out)
  assert loaded.model_cfg.ptq_rotation == "random_hadamard"
  assert not loaded.model_cfg.ptq_fused
  ppl = perplexity(loaded, corpus.load_corpus(loaded.run.data).eval[:8])
  assert np.isfinite(ppl["ppl"]) and ppl["ppl"] > 1
  # Same --out again: refused without --overwrite; a v2 run: refused.
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert again.returncode == 1 and "--overwrite" in again.stderr
  bad = subprocess.run(cmd[:3] + [f"--workdir={trained_run}",
                                  f"--out={tmp_path / 'v2'}", "--fuse-rotation"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
  assert bad.returncode == 1 and "b1.58" in bad.stderr
