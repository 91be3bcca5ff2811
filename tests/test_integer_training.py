"""Integer forward, straight-through backward (quant.train_matmul='int8'):
the same function and gradients as the fake-quantized float path, on one
device and sharded, with int8 codes where FSDP gathers weights."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.data.batch import Batch
from bitnet_jax.run_config import RunConfig
from bitnet_jax import partitioning, quant
from bitnet_jax.layers import BitLinear, QuantConfig
from bitnet_jax.model import ModelConfig, Transformer
from bitnet_jax.scale import dry_run, hlo_stats
from bitnet_jax.training import sharding
from bitnet_jax.training import train_step as step_lib
from bitnet_jax import ternary_matmul

QKV_GROUPS = (2, (0, 0, 1, 2))   # W_qkv [D, K, G + 2, E] with G = 2


def layer(matmul, bits, rotation, groups, dtype):
  features = (2, 4, 8) if groups else 24
  axes = ("embed", "kv_heads", None, "head_dim") if groups else ("mlp", "embed")
  return BitLinear(features, axes, rotation=rotation, scale_groups=groups,
                   dtype=dtype, quant=QuantConfig(act_bits=bits, matmul=matmul))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rotation,groups", [("none", None),
                                             ("activation", None),
                                             ("none", QKV_GROUPS)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_matches_the_fake_quantized_path(bits, rotation, groups, dtype):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 64)) * 2,
                  dtype)
  fake = layer("float", bits, rotation, groups, dtype)
  params = nn.meta.unbox(fake.init(jax.random.PRNGKey(0), x)["params"])

  def run(matmul):
    mod = layer(matmul, bits, rotation, groups, dtype)
    def loss(p, x):
      y = mod.apply({"params": p}, x).astype(jnp.float32)
      return jnp.sum(y * jnp.cos(y)), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params, x)
    return y, grads
  y_int, (gp_int, gx_int) = run("int8")
  y_fake, (gp_fake, gx_fake) = run("float")
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(y_int, y_fake, rtol=tol, atol=tol)
  # gradients: the STE of the fake path, through the same forward values
  gtol = 1e-4 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(np.asarray(gx_int, np.float32),
                             np.asarray(gx_fake, np.float32), rtol=gtol,
                             atol=gtol)
  for a, b in zip(jax.tree.leaves(gp_int), jax.tree.leaves(gp_fake)):
    np.testing.assert_allclose(a, b, rtol=gtol, atol=gtol * np.abs(b).max())


def test_integer_forward_is_exact_on_codes():
  """The int32 accumulator is exact: the forward equals the float64 product
  of the codes times the two scales."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((64, 32)) * 0.05, jnp.float32)
  y = ternary_matmul.ste_integer_matmul(x, w, 8, None, jnp.float32)
  xc, xs = quant.int8_codes(x)
  wc, alpha = quant.ternary_codes(w)
  ref = (np.asarray(xc, np.float64) @ np.asarray(wc, np.float64)) * \
      np.asarray(xs, np.float64) * float(alpha)
  np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_bad_integer_matmul_settings():
  with pytest.raises(ValueError, match="integer training matmul"):
    QuantConfig(act_bits=None, matmul="int8")
  with pytest.raises(ValueError, match="integer training matmul"):
    QuantConfig(act_bits=4, int4_scale="absmax", matmul="int8")
  with pytest.raises(ValueError, match="matmul must be one of"):
    QuantConfig(matmul="int4")


def model_cfg(variant="v2", bits=8, matmul="float"):
  return ModelConfig(vocab_size=64, d_model=64, d_ff=128, num_heads=4,
                     num_kv_heads=2, num_layers=2, seq_len=16, variant=variant,
                     act_bits=bits, train_matmul=matmul)


@pytest.mark.parametrize("variant,bits", [("v2", 8), ("v2", 4), ("b1.58", 8),
                                          ("a4.8", 4)])
def test_model_loss_and_gradients_match(variant, bits):
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (4, 17)),
                       jnp.int32)
  cfg = model_cfg(variant, bits)
  params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0),
                                               tokens[:, :-1])["params"])
  out = {}
  for matmul in ("float", "int8"):
    model = Transformer(cfg.replace(train_matmul=matmul))
    out[matmul] = jax.value_and_grad(step_lib.loss_fn, has_aux=True)(
        params, Batch(tokens), model)
  ((l_int, _), g_int), ((l_fake, _), g_fake) = out["int8"], out["float"]
  # The int8 path accumulates exactly (int32), the fake-quantized one in
  # float32: a projection's output differs by float32 rounding, and where the
  # next layer's input sits on a rounding boundary one activation code flips
  # (seen on some CPUs: b1.58 at 8 bits, loss 1.7e-5 apart, 7 of 64 final-norm
  # gradient entries 3% apart). So: the loss to 5e-5, each gradient leaf to
  # 2% of its norm (a wrong backward is off by O(1)).
  assert float(l_int) == pytest.approx(float(l_fake), rel=5e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_int)[0],
                          jax.tree.leaves(g_fake)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b) + 1e-12, (
        jax.tree_util.keystr(path), np.linalg.norm(a - b) / np.linalg.norm(b))


def fsdp_config(matmul, mesh=(1, 8, 1)):
  from test_sharding import small_config
  c = small_config(mesh)
  c.model.update(d_model=64, d_ff=128, vocab_size=128)
  c.quant.train_matmul = matmul
  return c


def test_codes_gathered_from_shards_are_the_unsharded_codes():
  """The absmean is one reduction over the shards; each shard rounds its own
  entries; what the matmul receives (gathered) is the whole kernel's codes."""
  run = RunConfig.from_config(fsdp_config("int8"))
  mesh = sharding.make_mesh(run.mesh, jax.devices()[:8])
  rules = sharding.logical_rules(run.mesh)
  w = np.random.default_rng(3).standard_normal((64, 4, 3, 16)).astype(
      np.float32) * 0.02
  axes = ("embed", "kv_heads", None, "head_dim")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    layouts = partitioning.matmul_layouts(axes)
    stored = jax.sharding.NamedSharding(mesh, layouts[0])
    assert "fsdp" in str(layouts[0]) and "fsdp" not in str(layouts[1])
    codes, alpha = jax.jit(lambda w: ternary_matmul.kernel_codes(
        w, (2, (0, 1, 2)), layouts))(jax.device_put(w, stored))
  want, want_alpha = quant.ternary_codes(jnp.asarray(w), (2, (0, 1, 2)))
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(want))
  np.testing.assert_allclose(alpha, want_alpha, rtol=1e-6)


def compiled_step(config, devices):
  setup, compiled, _ = dry_run.compile_step(config, devices)
  return setup, compiled.as_text()


def weight_gathers(text: str, setup) -> dict:
  """dtype of every all-gather whose result has a BitLinear kernel's shape
  (per layer), by shape."""
  shapes = {tuple(leaf.shape[1:]) for path, leaf in
            jax.tree_util.tree_flatten_with_path(setup.abstract.params)[0]
            if jax.tree_util.keystr(path).endswith("['kernel']") and
            "'layers'" in jax.tree_util.keystr(path)}
  found = {}
  for c in hlo_stats.analyze(text, 8).collectives:
    if c.kind != "all-gather":
      continue
    for dtype, dims in hlo_stats.arrays(c.shape):
      if tuple(dims) in shapes:
        found.setdefault(tuple(dims), set()).add(dtype)
  return found


def test_fsdp_step_gathers_int8_codes_and_multiplies_integers():
  devices = jax.devices()[:8]
  setup, text = compiled_step(fsdp_config("int8"), devices)
  gathers = weight_gathers(text, setup)
  assert len(gathers) == 4 and all(d == {"s8"} for d in gathers.values()), \
      gathers
  # every projection's forward is an s32-accumulating dot
  for site in ("qkv", "/o/", "up_gate", "down"):
    assert re.search(r"= s32\[[\d,]*\]\{[\d,]*\} dot\(.*op_name=\"[^\"]*"
                     + re.escape(site), text), site
  # the float path gathers the f32 latents instead
  setup, text = compiled_step(fsdp_config("float"), devices)
  assert all("s8" not in d for d in weight_gathers(text, setup).values())


def test_fsdp_int8_step_equals_one_device():
  from bitnet_jax.training import trainer
  losses = {}
  for mesh, n in (((1, 1, 1), 1), ((2, 4, 1), 8)):
    config = fsdp_config("int8", mesh)
    setup = trainer.build(config, jax.devices()[:n])
    losses[n] = _two_steps(setup, config)
  np.testing.assert_allclose(losses[8], losses[1], rtol=2e-5)


def _two_steps(setup, config):
  tokens = np.random.default_rng(4).integers(
      0, config.model.vocab_size,
      (config.data.batch_size, config.model.seq_len + 1)).astype(np.int32)
  init = jax.jit(step_lib.unboxed_init(Transformer(setup.model_cfg), setup.tx),
                 out_shardings=setup.state_sharding)
  with setup.context():
    state = init(jax.random.PRNGKey(0))
    out = []
    for _ in range(2):
      batch = sharding.global_batch(Batch(tokens), setup.mesh)
      state, metrics = setup.steps[8](state, batch)
      out.append(float(metrics["loss"]))
  return out


@pytest.mark.slow
def test_twenty_step_run_tracks_the_float_run(tmp_path, corpus_file):
  from bitnet_jax.training import trainer
  from conftest import small_run_config
  from test_train import losses
  runs = {}
  for matmul in ("float", "int8"):
    config = small_run_config(corpus_file, **{
        "quant.train_matmul": matmul, "quant.act_bits": 4,
        "train.stop_step": 20})
    trainer.train(config, str(tmp_path / matmul))
    runs[matmul] = [r["loss"] for _, r in sorted(
        losses(str(tmp_path / matmul)).items())]
  assert len(runs["int8"]) == 20
  np.testing.assert_allclose(runs["int8"], runs["float"], rtol=1e-3)


def tpu_program(matmul: str):
  """A 2-layer 400m-wide v2 step compiled for v5p:2x2x1 by the TPU compiler
  (libtpu, no TPU): (optimized HLO, bytes per step of the all-gathers inside
  the scanned layers by dtype: the weight gathers, norm scales in f32)."""
  from bitnet_jax.scale import fit_table
  config = fit_table.load_config("400m")   # its layout and remat, made small
  config.model.update(num_layers=2, d_model=256, d_ff=512, num_heads=4,
                      num_kv_heads=0, vocab_size=1024, seq_len=128)
  config.data.batch_size = 8
  config.quant.train_matmul = matmul
  devices, _ = dry_run.topology_devices("v5p:2x2x1")
  setup, compiled, _ = dry_run.compile_step(config, devices)
  text = compiled.as_text()
  lines = {m.group(1): l for l in text.splitlines()
           if (m := re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", l))}
  gathered = {}
  for c in hlo_stats.analyze(text, len(devices)).collectives:
    if c.kind != "all-gather" or "/while/body/" not in lines.get(c.name, ""):
      continue
    for dtype, _ in hlo_stats.arrays(c.shape)[:1]:
      gathered[dtype] = gathered.get(dtype, 0.0) + c.payload * c.count
  kernels = sum(np.prod(leaf.shape) for path, leaf in
                jax.tree_util.tree_flatten_with_path(setup.abstract.params)[0]
                if jax.tree_util.keystr(path).startswith("['layers']") and
                jax.tree_util.keystr(path).endswith("['kernel']"))
  return text, gathered, kernels


@pytest.mark.slow
def test_tpu_step_multiplies_integers_and_gathers_half_the_bytes():
  """On the real TPU compiler: every projection's forward is an integer
  matmul (a dot or convolution on int8 operands; its result s32, or bf16
  where the compiler folds the sums' rounding into it), and the
  weight gathers move int8 codes: at most 2 bytes per kernel parameter per
  step (the forward and the rematerialised forward), half of the least a
  bf16 step gathers (2 x 2 bytes; the float program compiled the same way
  gathers 2-3 x 2 bytes, measured in the closing note of issue 17)."""
  pytest.importorskip("libtpu")
  text, gathered, kernels = tpu_program("int8")
  defs = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", text))
  matmuls = re.finditer(r"= (?:s32|bf16)\[[^\n]*? (?:dot|convolution)\("
                        r"%([\w.\-]+), %([\w.\-]+)\)[^\n]*op_name=\"([^\"]*)\"",
                        text)
  integer_sites = [m.group(3) for m in matmuls
                   if defs.get(m.group(1)) == defs.get(m.group(2)) == "s8"]
  for site in ("qkv", "/o/", "up_gate", "down"):
    assert any(site in name for name in integer_sites), site
  assert "s8" in gathered and set(gathered) <= {"s8", "f32"}, gathered  # no
  # float kernel is gathered (f32: norm scales, when the compiler gathers them)
  assert kernels <= gathered["s8"] <= 0.5 * (2 * 2 * kernels), (gathered,
                                                                kernels)


def test_auto_follows_the_measurements_per_backend():
  cfg = model_cfg(matmul="auto")
  assert cfg.for_platform("tpu").train_matmul == "int8"
  assert cfg.for_platform("cpu").train_matmul == "int8"
  # GPU: int8, with the fused input kernel (Triton) where it applies
  gpu = cfg.for_platform("gpu")
  assert (gpu.train_matmul, gpu.input_kernel) == ("int8", "triton")
  assert cfg.for_platform("cpu").input_kernel == "jnp"
  assert model_cfg(matmul="float").for_platform("tpu").train_matmul == "float"
  from bitnet_jax.training import trainer
  setup = trainer.build(fsdp_config("auto"), jax.devices()[:8])
  assert setup.model_cfg.train_matmul == "int8"  # this host: cpu
