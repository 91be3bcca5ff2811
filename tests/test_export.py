"""Packed ternary export and the integer forward pass."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import subprocess_env
from bitnet_jax import packing
from bitnet_jax.inference import exported as export
from bitnet_jax.inference import pretrained
from bitnet_jax.layers import BitLinear, QuantConfig
from bitnet_jax.ternary_matmul import integer_matmul
from bitnet_jax.model import ModelConfig, Transformer

from np_reference import np_hadamard, np_ternary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("shape", [(1,), (3,), (5, 7), (13, 3, 9), (4, 4), (2, 3, 5, 7)])
def test_pack_round_trip_is_exact(shape):
  codes = np.random.default_rng(len(shape)).integers(-1, 2, shape).astype(np.int8)
  packed = packing.pack_ternary(codes)
  assert packed.dtype == np.uint8 and packed.shape == (-(-codes.size // 4),)
  np.testing.assert_array_equal(packing.unpack_ternary(packed, shape, xp=np), codes)
  np.testing.assert_array_equal(
      jax.jit(packing.unpack_ternary, static_argnums=1)(packed, shape), codes)
  # byte layout: value k of a byte sits in bits 2k..2k+1 as code + 1
  flat = codes.reshape(-1)
  assert int(packed[0]) & 3 == flat[0] + 1
  with pytest.raises(ValueError, match="must be in"):
    packing.pack_ternary(np.array([2]))
  with pytest.raises(ValueError, match="expected"):
    packing.unpack_ternary(packed[:-1] if packed.size > 1 else packed[:0], shape)


def test_nibbles_round_trip():
  codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, (3, 5, 8)), jnp.uint8)
  packed = packing.pack_nibbles(codes)
  assert packed.shape == (3, 5, 4)
  np.testing.assert_array_equal(packing.unpack_nibbles(packed), codes)


def test_integer_matmul_is_exact():
  rng = np.random.default_rng(1)
  x = rng.integers(-128, 128, (3, 7, 1536)).astype(np.int8)
  w = rng.integers(-1, 2, (1536, 2, 40)).astype(np.int8)
  acc = jax.jit(integer_matmul)(x, w)
  assert acc.dtype == jnp.int32
  want = np.einsum("bli,ijk->bljk", x.astype(np.int64), w.astype(np.int64))
  np.testing.assert_array_equal(np.asarray(acc, np.int64), want)


def tiny(variant, act_bits, **kw):
  return ModelConfig(vocab_size=96, d_model=64, d_ff=128, num_heads=2,
                     num_layers=2, seq_len=32, variant=variant,
                     act_bits=act_bits, **kw)


def trained_like(cfg, seed=0):
  """Params with the spread of trained weights (larger than the init)."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  init = jax.jit(Transformer(cfg).init)
  return trained_like_tree(init(jax.random.PRNGKey(seed), tokens)["params"], seed)


@pytest.mark.parametrize("act_bits,rotation,topk", [
    (8, "none", None), (4, "none", None), (8, "activation", None),
    (4, "activation", None), (4, "weight_and_activation", None), (8, "none", 0.5)])
@pytest.mark.parametrize("weights", ["int8", "packed"])
def test_integer_layer_equals_fake_quant(act_bits, rotation, topk, weights):
  """One (H-)BitLinear: the same codes either way, so only float rounding of
  the final scaling differs."""
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 64)), jnp.float32)
  common = dict(features=(3, 24), kernel_axes=("embed", None, "mlp"),
                rotation=rotation)
  layer = BitLinear(quant=QuantConfig(act_bits=act_bits, topk_ratio=topk), **common)
  params = trained_like_tree(layer.init(jax.random.PRNGKey(0), x)["params"])
  fake = np.asarray(layer.apply({"params": params}, x))
  codes, scale = export.ternary_tensor(params["kernel"], rotation ==
                                       "weight_and_activation", 64, False)
  iparams = {"norm": params["norm"], "scale": scale}
  if weights == "packed":
    iparams["packed"] = packing.pack_ternary(codes)
  else:
    iparams["codes"] = codes
  ilayer = BitLinear(quant=QuantConfig(act_bits=act_bits, topk_ratio=topk,
                                       weights=weights), **common)
  got = np.asarray(ilayer.apply({"params": iparams}, x))
  np.testing.assert_allclose(got, fake, rtol=2e-5, atol=2e-6 * np.abs(fake).max())


def trained_like_tree(params, seed=0):
  params = nn.meta.unbox(params)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))
  return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape),
                      params)


@pytest.mark.parametrize("run,act_bits", [("v2", 8), ("v2", 4), ("b1.58", 8)])
@pytest.mark.parametrize("weights", ["int8", "packed"])
def test_integer_model_equals_fake_quant(trained_run, b158_run, run, act_bits,
                                         weights):
  """A small trained model: logits to float rounding (a code that sits on a
  rounding boundary may flip between the two orders of summation)."""
  pre = pretrained.load(trained_run if run == "v2" else b158_run)
  cfg = pre.model_cfg.replace(act_bits=act_bits)
  tokens = np.asarray([pre.tokenizer.encode(
      "Document 4: The good life of the world, of the people. Then we")[:32]],
                      np.int32)
  fake = np.asarray(jax.jit(Transformer(cfg).apply)({"params": pre.params}, tokens))
  exported = export.inference_params(pre.params, cfg, weights, "float32")
  got = np.asarray(jax.jit(Transformer(cfg.replace(weights=weights)).apply)(
      {"params": exported}, tokens))
  assert np.linalg.norm(got - fake) / np.linalg.norm(fake) < 1e-3
  np.testing.assert_array_equal(got.argmax(-1), fake.argmax(-1))


@pytest.mark.parametrize("hadamard", ["activation", "weight_and_activation"])
def test_codes_are_the_training_graph_ternary_weights(hadamard):
  """Codes of W_down per layer = absmean ternary (Eq. 1-2) in float64 of W,
  or of H W for the Table 5 weight-and-activation rotation."""
  cfg = tiny("v2", 8, hadamard=hadamard)
  params = trained_like(cfg)
  exported = export.inference_params(params, cfg, "packed", "float32")
  for layer in range(2):
    w = np.asarray(params["layers"]["ffn"]["down"]["kernel"][layer], np.float64)
    if hadamard == "weight_and_activation":
      w = np_hadamard(w.shape[0]) @ w  # rotate the input axis
    codes, scale, pre = np_ternary(w)
    got = packing.unpack_ternary(exported["layers"]["ffn"]["down"]["packed"][layer],
                                 w.shape, xp=np)
    if hadamard == "activation":
      np.testing.assert_array_equal(got, codes)
    else:  # the f32 fwht may flip a value sitting on a rounding boundary
      differ = got != codes
      assert np.all(np.abs(np.abs(pre[differ]) - 0.5) < 1e-4)
      assert differ.mean() < 1e-3
    assert exported["layers"]["ffn"]["down"]["scale"][layer] == pytest.approx(scale, rel=1e-6)


@pytest.fixture(scope="module")
def exported_dir(trained_run, tmp_path_factory):
  out = tmp_path_factory.mktemp("export") / "model"
  proc = subprocess.run([sys.executable, "-m", "bitnet_jax.export",
                         f"--workdir={trained_run}", f"--out={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=subprocess_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "ratio 0.12" in proc.stdout
  return str(out)


def test_export_files_and_sizes(trained_run, exported_dir):
  report = json.loads(open(os.path.join(exported_dir, "export.json")).read())
  pre = pretrained.load(trained_run)
  cfg = pre.model_cfg
  linear = cfg.num_layers * (cfg.d_model * 3 * cfg.d_model + cfg.d_model * 2 * cfg.d_ff
                             + cfg.d_model * cfg.d_model + cfg.d_ff * cfg.d_model)
  assert report["linear_weights"] == linear
  # 2 bits per weight (per-layer tensors padded to whole bytes) + f32 scales,
  # one per projection: q, k, v; o; up, gate; down
  assert report["linear_bytes"] == 4 * cfg.num_layers * 7 + sum(
      cfg.num_layers * -(-n // 4) for n in (cfg.d_model * 3 * cfg.d_model,
                                            cfg.d_model * 2 * cfg.d_ff,
                                            cfg.d_model * cfg.d_model,
                                            cfg.d_ff * cfg.d_model))
  assert report["linear_ratio_to_bf16"] == pytest.approx(1 / 8, rel=0.02)  # + the f32 scales
  size = os.path.getsize(os.path.join(exported_dir, "model.safetensors"))
  assert report["file_bytes"] == size
  assert size < report["total_bytes"] + 20_000  # header + metadata only


def test_loaded_packed_model_matches_training_forward(trained_run, exported_dir):
  from bitnet_jax.inference import generation as generate
  pre = pretrained.load(trained_run)
  model = generate.load(exported_dir)
  assert model.model_cfg.weights == "packed"
  # exactly the ternary weights of training
  cfg, params = export.load_weights(exported_dir)
  w = np.asarray(pre.params["layers"]["attn"]["qkv"]["kernel"][1], np.float64)
  g = w.shape[2] - 2  # [D, K, G + 2, E]: W_q, W_k, W_v each own absmean
  codes = np.concatenate([np_ternary(w[:, :, sl])[0] for sl in
                          (np.s_[:g], np.s_[g:g + 1], np.s_[g + 1:])], axis=2)
  got = packing.unpack_ternary(params["layers"]["attn"]["qkv"]["packed"][1], w.shape, xp=np)
  np.testing.assert_array_equal(got, codes)
  # bf16 embedding/head/norms: logits close, greedy continuations identical
  prompts = ["The good life", "Document 3: the"]
  assert (generate.generate(model, prompts, max_new_tokens=10) ==
          generate.generate(pre, prompts, max_new_tokens=10))


def test_bad_model_directories(exported_dir, tmp_path):
  from bitnet_jax.inference import generation as generate
  with pytest.raises(FileNotFoundError, match="no config.json|no model.safetensors"):
    generate.load(str(tmp_path))
  broken = tmp_path / "broken"
  broken.mkdir()
  for name in os.listdir(exported_dir):
    data = open(os.path.join(exported_dir, name), "rb").read()
    if name == "model.safetensors":
      data = data[:len(data) // 2]
    (broken / name).write_bytes(data)
  with pytest.raises(ValueError, match="truncated or corrupt"):
    generate.load(str(broken))
  model = generate.load(exported_dir)
  too_long = " ".join(["the"] * 200)
  with pytest.raises(ValueError, match="the model's context is 32"):
    generate.generate(model, [too_long])
  proc = subprocess.run([sys.executable, "-m", "bitnet_jax.generate",
                         f"--model={broken}", "--prompt=hi"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env=subprocess_env())
  assert proc.returncode == 1 and "truncated or corrupt" in proc.stderr
