"""hlo_stats counts the compiled program's work; references are closed-form
FLOP counts and XLA's own cost analysis of loop-free programs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import defaults
from bitnet_jax.scale import hlo_stats
from bitnet_jax.scale import dry_run


def compile_text(fn, *shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, compiled.as_text()


def test_dot_flops_match_closed_form_and_xla():
  compiled, text = compile_text(lambda a, b: a @ b, (64, 96), (96, 40))
  stats = hlo_stats.analyze(text, 1)
  assert stats.matmul_flops == 2 * 64 * 96 * 40
  assert stats.matmul_flops == pytest.approx(
      compiled.cost_analysis()["flops"], rel=0.01)


def test_loop_trip_counts_are_applied():
  """XLA's cost analysis counts a while body once; hlo_stats multiplies by
  the trip count, nested loops by both."""
  def body(x, w):
    return jnp.tanh(x @ w), None

  def scanned(x, ws):
    return jax.lax.scan(body, x, ws)[0]

  def nested(x, ws):
    def outer(x, _):
      return scanned(x, ws), None
    return jax.lax.scan(outer, x, None, length=3)[0]

  per = 2 * 16 * 32 * 32
  compiled, text = compile_text(scanned, (16, 32), (5, 32, 32))
  assert hlo_stats.analyze(text, 1).matmul_flops == 5 * per
  assert compiled.cost_analysis()["flops"] < 2 * per  # the body, once
  _, text = compile_text(nested, (16, 32), (5, 32, 32))
  stats = hlo_stats.analyze(text, 1)
  assert stats.matmul_flops == 15 * per and not stats.unknown_trip_counts


def small_model_config(scan):
  c = defaults.base_config()
  c.model.update(vocab_size=256, d_model=64, d_ff=128, num_heads=4,
                 num_layers=3, seq_len=32, scan_layers=scan)
  c.data.batch_size = 8
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def test_train_step_flops_equal_the_model_unrolled_or_scanned():
  """The counted matmul FLOPs of a whole train step agree with 6 N + 12 L d T
  per token (the blocked Hadamard adds its small matmuls), and the scanned
  program counts the same as the unrolled one."""
  counts = {}
  for scan in (False, True):
    config = small_model_config(scan)
    setup, compiled, _ = dry_run.compile_step(config, jax.devices()[:1])
    counts[scan] = hlo_stats.analyze(compiled.as_text(), 1).matmul_flops
    tokens = config.data.batch_size * config.model.seq_len
    model = setup.flops_per_token * tokens
    assert model <= counts[scan] <= 1.1 * model, (scan, counts[scan], model)
  assert counts[True] == pytest.approx(counts[False], rel=1e-6)


def test_replica_group_forms():
  def inst(attrs):
    return hlo_stats.Instruction("x", "f32[8]", "all-reduce", [], attrs)
  assert hlo_stats.group_size(inst(
      "channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, "
      "to_apply=%add"), 8) == 4
  assert hlo_stats.group_size(inst(
      "replica_groups=[2,4]<=[8], to_apply=%add"), 8) == 4
  assert hlo_stats.group_size(inst(
      "replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add"), 8) == 2


def test_collective_payload_and_traffic():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(8), ("x",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  full = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def gather(a):
    return jax.lax.with_sharding_constraint(a * 2, full)

  arg = jax.ShapeDtypeStruct((1024, 64), jnp.float32, sharding=sharded)
  text = jax.jit(gather).lower(arg).compile().as_text()
  stats = hlo_stats.analyze(text, 8)
  payload = 1024 * 64 * 4
  assert stats.collective_bytes() == payload
  assert stats.collective_bytes(traffic=True) == payload * 7 / 8


def test_activation_batch_dims():
  text = "%a = f32[4,20,48]{2,1,0} add(...), %b = bf16[3,4,20,96] x, s32[20,48]"
  assert hlo_stats.activation_batch_dims(text, [(20, 48), (20, 96)]) == {4}


def test_conv_flops_count_valid_window_positions():
  """The TPU writes batched matmuls as convolutions whose windows slide over
  padded or dilated batch axes; only positions that read input count."""
  inst = hlo_stats.Instruction(
      "c", "f32[8,32,2048,2048]", "convolution", ["l", "r"],
      ", window={size=8x32 stride=7x31 lhs_dilate=8x32}, "
      "dim_labels=0b1f_0o1i->01bf")
  # lhs 0b1f = [8 (0), 2048 (b), 32 (1), 128 (f)]; rhs 0o1i = [8, 2048, 32, 128]
  flops = hlo_stats.conv_flops(inst, "f32[8,2048,32,128]", "f32[8,2048,32,128]")
  assert flops == 2 * 8 * 32 * 2048 * 2048 * 128  # Q K^T of 8 x 32 heads


def test_replica_groups_expand_and_hosts_spanned():
  """The groups of each form, against the iota they describe; a group that
  spans hosts is flagged only where its devices sit on two hosts."""
  def inst(attrs):
    return hlo_stats.Instruction("x", "f32[8]", "all-reduce", [], attrs)
  assert hlo_stats.replica_groups(inst(
      "replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add"), 8) == [
          [0, 4], [1, 5], [2, 6], [3, 7]]
  assert hlo_stats.replica_groups(inst(
      "replica_groups={{0,2},{1,3}}, to_apply=%add"), 4) == [[0, 2], [1, 3]]
  # mesh positions (a=4 major, b=2) hold device ids iota[2,4].T: (i, j) ->
  # 4 j + i; groups along a vary i
  mesh = ("replica_groups=mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a'}, "
          "use_global_device_ids=true")
  assert hlo_stats.replica_groups(inst(mesh), 8) == [[0, 1, 2, 3],
                                                     [4, 5, 6, 7]]
  assert hlo_stats.group_size(inst(mesh), 8) == 4
  along_b = mesh.replace("{'a'}", "{'b'}")
  assert hlo_stats.replica_groups(inst(along_b), 8) == [
      [0, 4], [1, 5], [2, 6], [3, 7]]
  text = "\n".join([
      "HloModule m", "",
      "ENTRY %main (p: f32[8]) -> f32[8] {",
      "  %p = f32[8]{0} parameter(0)",
      f"  %a = f32[8]{{0}} all-reduce(%p), channel_id=1, {mesh}, to_apply=%add",
      f"  ROOT %b = f32[8]{{0}} all-reduce(%a), channel_id=2, {along_b}, "
      "to_apply=%add",
      "}"])
  hosts = [0, 0, 0, 0, 1, 1, 1, 1]
  stats = hlo_stats.analyze(text, 8, hosts)
  assert [c.hosts for c in stats.collectives] == [1, 2]
  assert stats.collective_bytes(inter_host=True) == 32
  assert stats.collective_bytes(inter_host=False) == 32
  assert [c.hosts for c in hlo_stats.analyze(text, 8).collectives] == [1, 1]


def test_scanned_slices_of_a_stacked_buffer_count_the_slice():
  """A scan that reads layer i of a stacked [L, n, n] weight and writes row i
  of a stacked output moves O(L) bytes, not O(L^2): HBM bytes at 16 layers
  are ~4x those at 4 (a whole-buffer count would be ~16x)."""
  def scanned(x, ws):
    def body(x, w):
      y = jnp.tanh(x @ w)
      return y, y
    return jax.lax.scan(body, x, ws)

  totals = {}
  for layers in (4, 16):
    _, text = compile_text(scanned, (64, 128), (layers, 128, 128))
    totals[layers] = hlo_stats.analyze(text, 1).hbm_bytes
  assert 3.0 < totals[16] / totals[4] < 5.0, totals


def test_library_call_flops():
  """cuBLAS GEMM custom calls count by their dot dimensions; cuDNN attention
  by its score shape (checked against a compiled call in test_gpu_compile)."""
  gemm = hlo_stats.Instruction(
      "g", "(bf16[64,32]{1,0}, s8[0]{0})", "custom-call", ["a", "b"],
      'custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend'
      '_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],'
      '"rhs_contracting_dimensions":["0"]}}}')
  assert hlo_stats.custom_call_flops(gemm, ["bf16[64,96]", "bf16[96,32]"]) == (
      2 * 64 * 96 * 32)
  other = hlo_stats.Instruction("o", "f32[8]", "custom-call", ["a"],
                                'custom_call_target="Sharding"')
  assert hlo_stats.custom_call_flops(other, ["f32[8]"]) == 0
