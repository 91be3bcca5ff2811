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
