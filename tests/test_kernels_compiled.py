"""The fused H-BitLinear input kernel compiled by the real TPU compiler
(libtpu, no TPU): a Mosaic custom call that reads the activation as it lies
in memory (no relayout copy), counted by the roofline at hand-computed
FLOPs and bytes; and a 2-layer v2 train step that uses it in place of the
jnp stages (no FWHT left in the program)."""
import re

import jax
import jax.numpy as jnp
import pytest

from bitnet_jax.kernels import h_input
from bitnet_jax.scale import dry_run, hlo_flops, hlo_stats

pytestmark = pytest.mark.slow


def compile_kernel(topology, rows, n, bits):
  pytest.importorskip("libtpu")
  devices, _ = dry_run.topology_devices(topology)
  sh = jax.sharding.SingleDeviceSharding(devices[0])
  x = jax.ShapeDtypeStruct((rows, n), jnp.bfloat16, sharding=sh)
  s = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sh)
  fn = jax.jit(lambda x, s: h_input.quantized_input(
      x, s, bits=bits, eps=1e-5, impl="mosaic"))
  return fn.lower(x, s).compile().as_text()


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_the_kernel_compiles_and_the_roofline_counts_it(topology):
  rows, n = 4096, 4096
  text = compile_kernel(topology, rows, n, 8)
  calls = hlo_stats.analyze(text, 1).custom_calls()
  assert set(calls) == {"tpu_custom_call:" + h_input.FORWARD_NAME}, calls
  c = calls["tpu_custom_call:" + h_input.FORWARD_NAME]
  # by hand: 2 bf16 passes x (4096 rows x 32 chunks) x [128] . [128, 128]
  assert c["count"] == 1 and c["flops"] == 2 * 2 * rows * n * 128
  # operands + results: x bf16, the norm scale f32 [1, n], H_128 bf16,
  # the int8 codes and the f32 scales [rows, 1]
  assert c["bytes"] == rows * n * 2 + n * 4 + 128 * 128 * 2 + rows * n + \
      rows * 4
  # the activation is read as it lies: no copy of a [rows, n]-sized array
  for line in text.splitlines():
    m = re.search(r"= (\w+)\[([\d,]+)\][^ ]* copy\(", line)
    if m:
      dims = [int(d) for d in m.group(2).split(",")]
      assert jax.numpy.prod(jnp.asarray(dims)) < rows * n, line


def tpu_step(kernel, topology="v5p:2x2x1"):
  pytest.importorskip("libtpu")
  from bitnet_jax.scale import fit_table
  config = fit_table.load_config("400m")  # its layout and remat, made small
  config.model.update(num_layers=2, d_model=256, d_ff=1024, num_heads=4,
                      num_kv_heads=0, vocab_size=1024,
                      seq_len=384)  # a length no other axis has
  config.data.batch_size = 8
  config.quant.input_kernel = kernel
  devices, _ = dry_run.topology_devices(topology)
  setup, compiled, _ = dry_run.compile_step(config, devices)
  return compiled.as_text(), dry_run.summarize(setup, compiled, None)


def test_a_v2_train_step_runs_the_kernel_instead_of_the_fwht():
  """2 layers of the 400M config's layout (d 256, d_ff 1024: two and eight
  128-lane chunks), FSDP over 4 v5p chips: the
  forward kernel at W_o and W_down (the remat forward too), the backward
  kernel at both; no FWHT op remains (the jnp path has them); splash
  attention, with no [.., T, T] array left; the custom calls' costs appear
  in the report."""
  text, report = tpu_step("")  # '' = by backend: the kernel on TPU
  sites = hlo_flops.call_sites(text)
  assert sites.get("tpu_custom_call:" + h_input.FORWARD_NAME, 0) >= 2
  assert sites.get("tpu_custom_call:" + h_input.BACKWARD_NAME, 0) >= 2
  assert "_fwht_impl" not in text  # the jnp FWHT's ops are named so
  assert report["attention"] == "pallas"  # splash (kernels/splash.py)
  assert sites.get("tpu_custom_call:splash_mha_fwd_residuals", 0) >= 1
  # no [.., T, T] scores: the largest array with two trailing sequence axes
  assert not re.search(r"\[[\d,]*384,384\]", text)
  assert "custom call tpu_custom_call:bitnet_h_input_fwd" in \
      dry_run.format_report(report)
  # the check can fail: the same layer on the jnp stages holds the FWHT
  reference = layer_program("jnp")
  assert "_fwht_impl" in reference and h_input.FORWARD_NAME not in reference
  assert h_input.FORWARD_NAME in layer_program("")


def test_the_v6e_train_step_runs_the_kernel_too():
  """The same 2-layer step for Trillium (v6e: a 256-wide matrix unit; the
  kernel keeps its 128-lane chunks): both kernels, no FWHT."""
  text, _ = tpu_step("", "v6e:2x2")
  sites = hlo_flops.call_sites(text)
  assert sites.get("tpu_custom_call:" + h_input.FORWARD_NAME, 0) >= 2
  assert sites.get("tpu_custom_call:" + h_input.BACKWARD_NAME, 0) >= 2
  assert "_fwht_impl" not in text


def layer_program(kernel: str) -> str:
  """One v2 W_down (H-BitLinear, integer matmul) forward and backward,
  compiled for one v5p chip."""
  from bitnet_jax.layers import BitLinear, QuantConfig
  from bitnet_jax.model_config import AUTO_INPUT_KERNEL
  devices, _ = dry_run.topology_devices("v5p:2x2x1")
  sh = jax.sharding.SingleDeviceSharding(devices[0])
  layer = BitLinear(features=256, kernel_axes=("mlp", "embed"),
                    rotation="activation", dtype=jnp.bfloat16,
                    quant=QuantConfig(matmul="int8", input_kernel=kernel or
                                      AUTO_INPUT_KERNEL["tpu"]))
  x = jax.ShapeDtypeStruct((4, 128, 1024), jnp.bfloat16, sharding=sh)
  params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype,
                                                       sharding=sh), params)
  loss = lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32))
  return jax.jit(jax.grad(loss, (0, 1))).lower(params, x).compile().as_text()


def test_splash_attention_compiles_and_the_roofline_counts_it():
  """[4, 512, 8, 128] bf16 causal, forward and backward, one v5p chip:
  the three splash kernels, FLOPs by hand: 2 T T E per matmul per head and
  batch row over the computed blocks (block 256 here: 3 of the 4 (q, k)
  block pairs lie on or below the diagonal), 2 / 3 / 4 matmuls."""
  pytest.importorskip("libtpu")
  from bitnet_jax.kernels import splash
  devices, _ = dry_run.topology_devices("v5p:2x2x1")
  sh = jax.sharding.SingleDeviceSharding(devices[0])
  q = jax.ShapeDtypeStruct((4, 512, 8, 128), jnp.bfloat16, sharding=sh)
  loss = lambda q, k, v: jnp.sum(splash.attention(q, k, v, block=256)
                                 .astype(jnp.float32))
  text = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, q, q).compile().as_text()
  calls = hlo_stats.analyze(text, 1).custom_calls()
  per_matmul = 2 * 4 * 8 * 3 * 256 * 256 * 128
  got = {k.split(":")[-1]: v["flops"] for k, v in calls.items()
         if "splash" in k}
  assert got == {"splash_mha_fwd_residuals": 2 * per_matmul,
                 "splash_mha_dq_no_residuals": 3 * per_matmul,
                 "splash_mha_dkv_no_residuals": 4 * per_matmul}, got


def test_native_int4_codes_compile_and_move_fewer_bytes():
  """scale/int4_codes.py (the 4-bit codes question, docs/scale.md): s4 x s4
  and s4 x s2 dots compile for a v5p chip, and the roofline counts their
  operands at 4 and 2 bits: half and less of the int8 operand bytes."""
  pytest.importorskip("libtpu")
  from bitnet_jax.scale import int4_codes
  m = k = n = 512
  rows = int4_codes.compare("v5p:2x2x1", m, k, n)
  assert [r["codes"] for r in rows] == ["int8 x int8", "int4 x int4",
                                         "int4 x int2"]
  out = m * n * 4  # the s32 result
  by_codes = {r["codes"]: r["hbm_bytes"] - out for r in rows}
  assert by_codes["int4 x int4"] == pytest.approx(
      by_codes["int8 x int8"] / 2, rel=0.01)
  assert by_codes["int4 x int2"] < by_codes["int4 x int4"]
  assert all(r["compiler_s"] > 0 for r in rows)
