"""The fused H-BitLinear input kernel for NVIDIA GPUs
(kernels/h_input_triton.py) compiled by XLA's GPU compiler from this host
(the CUDA plugin, no GPU): a Triton custom call per direction, named as the
kernel, counted by the roofline at hand-computed FLOPs and bytes, reading
the activation as it lies (no copy of it); widths Triton cannot tile take
the jnp stages."""
import re

import pytest

from bitnet_jax.kernels import h_input
from bitnet_jax.scale import gpu_topology, hlo_stats

TRITON = "__gpu$xla.gpu.triton:"


def compile_both(rows, n):
  pytest.importorskip("jax_plugins.xla_cuda12")
  import jax
  import jax.numpy as jnp
  devices = gpu_topology.devices("h100:1")
  sh = jax.sharding.SingleDeviceSharding(devices[0])
  arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  x, s = arg((rows, n), jnp.bfloat16), arg((n,), jnp.float32)
  fwd = jax.jit(lambda x, s: h_input.quantized_input(
      x, s, bits=4, eps=1e-5, impl="triton")).lower(x, s).compile()
  bwd = jax.jit(lambda x, s, dz: h_input.input_grads(
      x, s, dz, eps=1e-5, impl="triton")).lower(x, s, x).compile()
  return fwd.as_text(), bwd.as_text()


def test_the_triton_kernel_compiles_and_the_roofline_counts_it():
  rows, n = 2048, 4096          # H_4096 = H_64 (x) H_64: X [64, 64] per row
  fwd, bwd = compile_both(rows, n)
  calls = hlo_stats.analyze(fwd, 1).custom_calls()
  assert set(calls) == {TRITON + h_input.FORWARD_NAME}, calls
  c = calls[TRITON + h_input.FORWARD_NAME]
  # by hand: 2 bf16 passes x rows x ([64, 64] . [64, 64] twice: H_B, H_A)
  passes, a, b = 2, 64, 64
  assert c["count"] == 1
  assert c["flops"] == passes * rows * (2 * a * b * b + 2 * a * a * b)
  # operands + results: x bf16, the norm scale f32 [64, 64], H_A and H_B
  # bf16, the int8 codes and the f32 scales [rows, 1]
  h_bytes = (a * a + b * b) * 2
  assert c["bytes"] == rows * n * 2 + n * 4 + h_bytes + rows * n + rows * 4
  calls = hlo_stats.analyze(bwd, 1).custom_calls()
  c = calls[TRITON + h_input.BACKWARD_NAME]
  grid = rows // 16  # h_input_triton.ROWS tokens a program: one ds partial
  # the backward's first operand, dL/dq in bf16, is exact in one pass
  assert c["flops"] == rows * (2 * a * b * b + passes * 2 * a * a * b)
  assert c["bytes"] == (rows * n * 2 * 2 + n * 4 + h_bytes   # x, dz, s, H
                        + rows * n * 2 + grid * n * 4)       # dx, ds
  # the activation is read as it lies: no copy of a [rows, n]-sized array
  for text in (fwd, bwd):
    for m in re.finditer(r"= \w+\[([\d,]+)\][^ ]* copy\(", text):
      size = 1
      for d in m.group(1).split(","):
        size *= int(d)
      assert size < rows * n, m.group(0)


def test_where_the_triton_kernel_applies():
  assert all(h_input.supported(n, "triton") for n in (256, 1024, 4096, 16384))
  # Paley widths (the tiny config's 384) and beyond 128 x 128 take the stages
  assert not h_input.supported(12 * 32, "triton")
  assert not h_input.supported(32768, "triton")
  assert h_input.supported(12 * 32, "interpret")  # the TPU kernel takes them
