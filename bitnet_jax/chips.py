"""Accelerator peaks: the numbers the MFU log line and the roofline estimate use.

Per chip (TPU) or GPU, from the vendors' published specifications:
  bf16_flops   dense bf16 matmul peak, FLOP/s
  int8_ops     dense int8 matmul peak, OP/s
  hbm_bytes    memory capacity, bytes
  hbm_bw       memory bandwidth, bytes/s
  ici_bw       bidirectional inter-chip bandwidth per chip, bytes/s (v5e
               400 GB/s, v5p 1200, v6e 800; v4 twice its all-reduce bandwidth
               per chip, 1.1 PB/s over 4096 chips; GPUs: NVLink). A ring
               collective that sends T bytes per chip then takes T / ici_bw,
               which is what the vendors' all-reduce bandwidths per pod give
               (v5e: 51.2 TB/s over 256 chips = half of 400 GB/s, as an
               all-reduce sends twice its payload). GPUs: NVLink per
               direction (H100/H200 450 GB/s of the 900 bidirectional, B200
               900, A100 300), which is what a ring over NVSwitch sends at
  f32_flops    float32 matmul rate at Precision.HIGHEST (the FWHT's blocks):
               GPUs run it on the CUDA cores (FP32, non-tensor: H100 / H200
               67 TFLOP/s, A100 19.5, B200 80), TPUs as six bf16 passes on
               the MXU (bf16_flops / 6)
  dcn_bw       bandwidth per chip between hosts, bytes/s per direction (GPUs:
               one InfiniBand / RoCE NIC per GPU, as in NVIDIA's HGX / DGX
               systems: 400 Gb/s ConnectX-7 = 50 GB/s on H100, H200 and B200,
               200 Gb/s HDR = 25 GB/s on A100); 0 where not modelled (TPU:
               multi-slice DCN transfers are reported, not timed). A
               collective whose group spans hosts runs at this speed

A GPU run gets GPU_MEMORY_FRACTION of its memory (what XLA's allocator
takes, XLA_PYTHON_CLIENT_MEM_FRACTION; `usable_bytes`): the dry run fits a
program against that, not the whole HBM.

Looked up by device kind (`jax.Device.device_kind`, lower case substring) or
by a topology name's prefix (`v5p:4x4x4` -> v5p).
"""
from __future__ import annotations

import dataclasses

GIB = 1024 ** 3
# XLA_PYTHON_CLIENT_MEM_FRACTION on GPUs: the train command and
# launch/slurm.sbatch set 0.92 unless the user did (JAX's own default, 0.75,
# leaves a quarter of an 80 GB GPU unused)
GPU_MEMORY_FRACTION = 0.92


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_flops: float
  int8_ops: float
  hbm_bytes: float
  hbm_bw: float
  ici_bw: float
  dcn_bw: float = 0.0
  f32_flops: float = 0.0   # 0: bf16_flops / 6 (six bf16 passes)

  @property
  def f32_rate(self) -> float:
    return self.f32_flops or self.bf16_flops / 6

  @property
  def is_gpu(self) -> bool:
    return self.name.startswith("NVIDIA")

  def usable_bytes(self, environ=None) -> float:
    """What a program may use: the HBM (TPU), its allocator's fraction of
    it (GPU: XLA_PYTHON_CLIENT_MEM_FRACTION in `environ`, else
    GPU_MEMORY_FRACTION)."""
    if not self.is_gpu:
      return self.hbm_bytes
    environ = {} if environ is None else environ
    return self.hbm_bytes * float(environ.get(
        "XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 275e12, 32 * GIB, 1200e9, 2 * 1.1e15 / 4096),
    "v5e": Chip("TPU v5e", 197e12, 394e12, 16 * GIB, 819e9, 400e9),
    "v5p": Chip("TPU v5p", 459e12, 918e12, 95 * GIB, 2765e9, 1200e9),
    "v6e": Chip("TPU v6e", 918e12, 1836e12, 32 * GIB, 1640e9, 800e9),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 1979e12, 80e9, 3350e9, 450e9, 50e9,
                 67e12),
    "h200": Chip("NVIDIA H200", 989e12, 1979e12, 141e9, 4800e9, 450e9, 50e9,
                 67e12),
    "a100": Chip("NVIDIA A100 SXM", 312e12, 624e12, 80e9, 2039e9, 300e9, 25e9,
                 19.5e12),
    "b200": Chip("NVIDIA B200", 2250e12, 4500e12, 180e9, 8000e9, 900e9, 50e9,
                 80e12),
}
# device_kind substrings (lower case) -> table key, most specific first.
_KINDS = (("v6 lite", "v6e"), ("v6e", "v6e"), ("v5 lite", "v5e"),
          ("v5e", "v5e"), ("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4"),
          ("h200", "h200"), ("h100", "h100"), ("a100", "a100"),
          ("b200", "b200"))


def for_device_kind(kind: str) -> Chip | None:
  kind = kind.lower()
  for key, name in _KINDS:
    if key in kind:
      return CHIPS[name]
  return None


def for_topology(name: str) -> Chip | None:
  """`v5p:4x4x4` -> the v5p chip; None for cpu:N and unknown names."""
  return CHIPS.get(name.split(":")[0].lower())
