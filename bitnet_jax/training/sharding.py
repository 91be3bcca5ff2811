"""Device mesh, logical-axis rules, shardings of the state and the batch.

The mesh has axes (data, fsdp, tensor); config.mesh gives their sizes, -1
fills with the remaining devices. Parameters carry logical axis names
(`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `layers`, ...) and
config.mesh.rules maps them to mesh axes; names without a rule are replicated.
The batch is split over (data, fsdp). Multi-host runs call
`initialize_distributed` first; each process then feeds its own rows and
`global_batch` assembles them with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bitnet_jax.errors import ConfigError
from bitnet_jax.partitioning import BATCH_AXES, MESH_AXES
from bitnet_jax.data.batch import Batch
from bitnet_jax.run_config import MeshConfig


def network_granules(devices: Sequence[Any]) -> list[int]:
  """Per device, the group that the fast interconnect joins: its slice on
  TPU (ICI spans a slice's hosts), its host on GPU (NVLink within a host,
  a NIC per GPU between hosts); one group on CPU."""
  if not devices:
    return []
  platform = devices[0].platform
  if platform == "tpu":
    return [getattr(d, "slice_index", 0) for d in devices]
  if platform == "gpu":
    if max(d.process_index for d in devices) >= jax.process_count():
      # compile-only devices of a topology: process_index is the host
      return [d.process_index for d in devices]
    hosts = process_hosts()  # one process per GPU (SLURM) shares a host
    return [hosts[d.process_index] for d in devices]
  return [0] * len(devices)


def process_hosts() -> list[int]:
  """Per process of the run, an index of its machine (processes started one
  per GPU on one host share it): every process's hostname, all-gathered."""
  if jax.process_count() == 1:
    return [0]
  if _PROCESS_HOSTS:
    return _PROCESS_HOSTS[0]
  import socket
  import zlib
  from jax.experimental import multihost_utils
  mine = np.asarray(zlib.crc32(socket.gethostname().encode()), np.int64)
  names = [int(h) for h in np.asarray(
      multihost_utils.process_allgather(mine)).reshape(-1)]
  index = {h: i for i, h in enumerate(dict.fromkeys(names))}
  _PROCESS_HOSTS.append([index[h] for h in names])  # asked once per run
  return _PROCESS_HOSTS[0]


_PROCESS_HOSTS: list[list[int]] = []


def slices(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> int:
  """mesh.dcn_data: slices (TPU) or hosts (GPU) along data. -1 (auto): as
  many as the devices span, so that a multi-host GPU run is HSDP (FSDP and
  tensor parallelism within a host, data parallelism between hosts) and a
  multi-slice TPU run keeps FSDP on ICI; 1 without devices to look at."""
  if mesh_cfg.dcn_data == -1:
    return len(set(network_granules(devices))) if devices else 1
  return mesh_cfg.dcn_data


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int,
               dcn: int | None = None) -> tuple[int, int, int]:
  """(data, fsdp, tensor) of the whole mesh: the sizes apply per slice
  (mesh.dcn_data slices), and the slices multiply the data axis."""
  dcn = slices(mesh_cfg) if dcn is None else dcn
  if num_devices % dcn:
    raise ConfigError(f"mesh.dcn_data={dcn} does not divide the {num_devices} "
                      "devices")
  data, fsdp, tensor = _slice_shape(mesh_cfg, num_devices // dcn)
  return data * dcn, fsdp, tensor


def _slice_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  sizes = list(mesh_cfg.sizes())  # MeshConfig: positive, at most one -1
  fills = [i for i, s in enumerate(sizes) if s == -1]
  fixed = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % fixed:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the "
                       f"{num_devices} devices")
    sizes[fills[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs "
                     f"{math.prod(sizes)} devices, but there are {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh. With mesh.dcn_data = S > 1 the data axis
  is S slices x the per-slice data size (slices outermost, from each
  device's slice_index): only data-parallel collectives (the gradient
  all-reduce) cross slices; FSDP and tensor parallelism stay on ICI."""
  devices = list(devices if devices is not None else jax.devices())
  dcn = slices(mesh_cfg, devices)
  shape = mesh_shape(mesh_cfg, len(devices), dcn)
  if dcn > 1:
    per_slice = (shape[0] // dcn, shape[1], shape[2])
    platform = devices[0].platform
    found = len(set(network_granules(devices)))
    if platform == "tpu" and hasattr(devices[0], "slice_index"):
      if found != dcn:
        raise ConfigError(f"mesh.dcn_data={dcn}, but the devices span {found} "
                          "slice(s)")
      arr = mesh_utils.create_hybrid_device_mesh(per_slice, (dcn, 1, 1),
                                                 devices)
    else:  # GPU hosts (NVSwitch: any order within one), CPU: consecutive
      granule = dict(zip((id(d) for d in devices), network_granules(devices)))
      devices = sorted(devices, key=lambda d: (granule[id(d)], d.process_index,
                                               d.id))
      arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)
  try:  # topology-aware device order where the backend knows one
    arr = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # e.g. CPU or an irregular device count
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def logical_rules(mesh_cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
  """logical axis -> mesh axes (checked against MESH_AXES by MeshConfig)."""
  return mesh_cfg.rules


def state_shardings(abstract_boxed_state, mesh: Mesh, rules) -> Any:
  """NamedShardings for a state whose params carry logical-axis boxes."""
  specs = nn.get_partition_spec(abstract_boxed_state)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Batch, mesh: Mesh) -> Batch:
  """Assemble the global batch from this process's rows (no host gather)."""
  sharding = batch_sharding(mesh)
  return local.map(lambda value: jax.make_array_from_process_local_data(
      sharding, value, (value.shape[0] * jax.process_count(),
                        *value.shape[1:])))


def check_batch_divides(batch_size: int, mesh: Mesh, microbatches: int = 1) -> None:
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch_size % (shards * microbatches):
    raise ConfigError(f"data.batch_size {batch_size} is not divisible by the "
                     f"{shards} batch shards of mesh {dict(mesh.shape)} times "
                     f"train.microbatches {microbatches}")


def initialize_distributed(mode: str, coordinator: str = "",
                           num_processes: int = 0, process_id: int = -1) -> bool:
  """Join a multi-process run: 'auto' (TPU pod / SLURM / flags), 'on', 'off'."""
  if mode == "off":
    return False
  explicit = bool(coordinator)
  env_multi = (int(os.environ.get("SLURM_NTASKS", "1")) > 1
               or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
               or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))
  if mode == "auto" and not (explicit or env_multi):
    return False
  # Cross-process collectives on CPU need gloo; harmless on accelerators. (No
  # jax.default_backend() here: the backend must not start before initialize.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d", jax.process_index(),
               jax.process_count())
  return True
