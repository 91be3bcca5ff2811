"""Compile-only NVIDIA GPU devices: `--topology=h100:8` (one host of 8 GPUs) or
`h100:8x8` (8 hosts x 8 GPUs), no GPU and no CUDA driver needed.

XLA's GPU compiler runs on this host when the CUDA plugin is installed
(`pip install -r requirements-gpu.txt`: jax-cuda12-plugin and -pjrt at our jax
version, plus the cuDNN library for cuDNN attention). It is given the GPU's
description instead of asking a driver: a `GpuTargetConfigProto` in text form,
kept per GPU model in `gpu_targets/*.txtpb` (written from the vendors'
published specifications). `jax.experimental.topologies.get_topology_desc`
then returns one compile-only device per GPU; a device's `process_index` is
its host, which the mesh (HSDP) and the collective accounting read.
"""
from __future__ import annotations

import os
import re
from importlib import resources

from bitnet_jax.errors import ConfigError

TARGETS_PACKAGE = "bitnet_jax.scale"
TARGETS_DIR = "gpu_targets"
_NAME_RE = re.compile(r"^([a-z0-9]+):(\d+)(?:x(\d+))?$")


class GpuTopologyError(ConfigError):
  """A GPU topology that cannot be compiled for here (one line)."""


def models() -> tuple[str, ...]:
  """GPU models with a target description (h100, h200, a100, b200)."""
  folder = resources.files(TARGETS_PACKAGE) / TARGETS_DIR
  return tuple(sorted(p.name[:-len(".txtpb")] for p in folder.iterdir()
                      if p.name.endswith(".txtpb")))


def is_gpu_topology(name: str) -> bool:
  return name.split(":")[0].lower() in models()


def parse(name: str) -> tuple[str, int, int]:
  """'h100:8x8' -> ('h100', hosts 8, GPUs per host 8); 'h100:8' is one host."""
  m = _NAME_RE.match(name.lower())
  if not m or m.group(1) not in models():
    raise GpuTopologyError(
        f"--topology={name}: expected MODEL:GPUS or MODEL:HOSTSxGPUS with "
        f"MODEL one of {', '.join(models())} (e.g. h100:8, h100:8x8)")
  model = m.group(1)
  if m.group(3) is None:
    hosts, per_host = 1, int(m.group(2))
  else:
    hosts, per_host = int(m.group(2)), int(m.group(3))
  if hosts < 1 or per_host < 1:
    raise GpuTopologyError(f"--topology={name}: sizes must be positive")
  return model, hosts, per_host


def target_config(model: str) -> str:
  """The GpuTargetConfigProto text of a GPU model."""
  return (resources.files(TARGETS_PACKAGE) / TARGETS_DIR /
          f"{model}.txtpb").read_text()


def devices(name: str) -> list:
  """Compile-only devices of a GPU topology, host-major (process_index = host)."""
  model, hosts, per_host = parse(name)
  # The plugin's start-up check of the CUDA libraries calls cuInit, which has
  # no driver to call here; the default backend stays the CPU, so that eager
  # jnp calls at setup never try to open a GPU.
  os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  try:
    import jax_plugins.xla_cuda12  # noqa: F401  (only to say how to get it)
  except ImportError:
    raise GpuTopologyError(
        f"--topology={name} compiles with XLA's GPU compiler, which comes with "
        "the CUDA plugin: pip install -r requirements-gpu.txt (no GPU "
        "needed)") from None
  from jax.experimental import topologies
  try:
    desc = topologies.get_topology_desc(
        topology_name="", platform="cuda", topology=f"1x{hosts}x{per_host}",
        target_config=target_config(model))
  except Exception as e:  # the plugin's own message names the problem
    raise GpuTopologyError(
        f"--topology={name}: {str(e).splitlines()[0]}") from None
  return sorted(desc.devices, key=lambda d: (d.process_index, d.id))


def cudnn_available() -> bool:
  """Whether the cuDNN library (nvidia-cudnn-cu12) is installed: XLA needs it
  to compile cuDNN attention ('cuDNN not found' otherwise)."""
  try:
    import nvidia.cudnn  # noqa: F401
  except ImportError:
    return False
  return True
