"""`--dry_run [--topology=NAME]`: compile the real train step and say what it costs.

Nothing is allocated and no accelerator is needed: the step is lowered from
abstract shapes and compiled for this host's devices, for `cpu:N` host
devices, or for a TPU slice that libtpu describes (`v5p:4x4x4`, `v5e:16x16`,
`v6e:8x8`, `v4:2x2x2`, ...). The report, per chip:

  memory       arguments, temporaries and total from the compiler's
               memory analysis, against the chip's HBM
  FLOPs        matmul FLOPs counted in the optimized program (`hlo_stats`,
               trip counts applied) next to the model's: 6 N + 12 L d T per
               token (PaLM), plus the rematerialised forward pass
  collectives  payload bytes per kind next to what the layout needs (ZeRO-3:
               weights gathered for the forward pass and again for the
               rematerialised one, gradients reduce-scattered, per
               microbatch; data parallelism: gradients all-reduced)
  estimate     a roofline of the step: every top-level op takes
               max(FLOPs / peak, bytes / HBM bandwidth) (the peak of its
               operand type: bf16, int8, or float32 at HIGHEST precision,
               which the FWHT's blocks use), collectives take
               ring traffic / ICI bandwidth and overlap the ops; MFU = the
               model's FLOPs / (step time x bf16 peak). An estimate, not a
               measurement (chips.py has the peaks).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from bitnet_jax import chips as chips_lib
from bitnet_jax import run_config
from bitnet_jax.scale import gpu_topology
from bitnet_jax.scale import hlo_flops, hlo_stats, hlo_text
from bitnet_jax.training import sharding
from bitnet_jax.errors import ConfigError, UserError
from bitnet_jax.model import count_params

GIB = 1024.0 ** 3


class TopologyError(ConfigError):
  """A --topology that cannot be had here (reported as one line)."""


def topology_devices(name: str, num_slices: int = 1
                     ) -> tuple[list, chips_lib.Chip | None]:
  """Devices to compile for, and the chip whose peaks apply (None: unknown);
  a TPU topology num_slices times (multi-slice: devices carry slice_index)."""
  if not name:
    devices = jax.devices()
    return devices, chips_lib.for_device_kind(devices[0].device_kind)
  if name.startswith("cpu:"):
    try:
      n = int(name[4:])
    except ValueError:
      raise TopologyError(f"--topology={name}: expected cpu:N") from None
    n *= num_slices
    cpu = jax.devices("cpu")
    if len(cpu) < n:
      raise TopologyError(
          f"--topology={name}: this process has {len(cpu)} CPU devices; set "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before "
          "starting (python -m bitnet_jax.train does it for --topology=cpu:N)")
    return cpu[:n], None
  if gpu_topology.is_gpu_topology(name):
    if num_slices > 1:
      raise TopologyError(f"--num_slices is for TPU slices; a GPU cluster is "
                          f"HOSTSxGPUS ({name.split(':')[0]}:8x8)")
    return gpu_topology.devices(name), chips_lib.for_topology(name)
  try:
    import libtpu  # noqa: F401  (only to say how to get it)
  except ImportError:
    raise TopologyError(
        f"--topology={name} compiles with the TPU compiler, which comes with "
        "libtpu: pip install -r requirements-tpu.txt (no TPU needed)") from None
  # Compile-only: no TPU is opened, so several processes (a test run, a fit
  # table) may load libtpu at once; and libtpu need not look for workers.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  from jax.experimental import topologies
  try:
    extra = {"num_slices": num_slices} if num_slices > 1 else {}
    desc = topologies.get_topology_desc(topology_name=name, platform="tpu",
                                        **extra)
    if any(getattr(d, "core_on_chip", 0) for d in desc.devices):
      # v4 describes each TensorCore; JAX runs it as one device per chip
      desc = topologies.get_topology_desc(topology_name=name, platform="tpu",
                                          chip_config_name="megacore", **extra)
  except Exception as e:  # libtpu's own message names the problem
    raise TopologyError(f"--topology={name}: {str(e).splitlines()[0]}") from None
  return list(desc.devices), chips_lib.for_topology(name)


def model_flops_per_token(setup) -> tuple[float, float]:
  """(the model's FLOPs per token, the same plus the rematerialised forward)."""
  cfg = setup.model_cfg
  layer_params = count_params(setup.abstract.params["layers"]) if (
      "layers" in setup.abstract.params) else sum(
          count_params(v) for k, v in setup.abstract.params.items()
          if k.startswith("layer_"))
  attention_fwd = 4.0 * cfg.num_layers * cfg.d_model * cfg.seq_len
  remat = 2.0 * layer_params + attention_fwd if cfg.remat == "full" else (
      attention_fwd if cfg.remat == "dots" else 0.0)
  return setup.flops_per_token, setup.flops_per_token + remat


def zero3_payload(setup) -> float:
  return sum(zero3_payload_by_axis(setup).values())


def zero3_payload_by_axis(setup) -> dict[str, float]:
  """Collective payload bytes per chip the layout needs for one step, at
  least: a weight sharded over `fsdp` (ZeRO-3) is gathered in the compute
  dtype for the forward pass, again for the rematerialised one, and its
  gradient reduce-scattered, once per microbatch; where `data` replicates
  it, its gradient (shard) is all-reduced once per step. The embedding table
  is looked up by rows (an all-to-all of activations), not gathered. With
  quant.train_matmul='int8' the quantized kernels are gathered as int8 codes
  (1 byte), their gradients still in the compute dtype."""
  from bitnet_jax import policy, sites
  cfg = setup.model_cfg
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  gathers = 2 if cfg.remat == "full" else 1
  data = setup.mesh.shape["data"]
  total = {"fsdp": 0.0, "data": 0.0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(setup.abstract.params)[0]:
    if getattr(path[0], "key", "") == "embed" and not cfg.tie_embeddings:
      continue
    keys = [getattr(p, "key", "") for p in path]
    found = sites.locate(keys) if sites.is_weight_matrix(keys) else None
    quant = policy.linear(cfg, found.site.name).quant if found else None
    gathered = 1 if quant and quant.matmul == "int8" else itemsize
    axes = _axes(leaf)
    local = math.prod(leaf.shape) / math.prod(setup.mesh.shape[a] for a in axes)
    fsdp = math.prod(setup.mesh.shape[a] for a in axes if a == "fsdp")
    if fsdp > 1:
      total["fsdp"] += (local * fsdp * (gathered * gathers + itemsize)
                        * setup.run.train.microbatches)
    if data > 1:
      total["data"] += local * itemsize
  return total


def _axes(leaf) -> list[str]:
  out = []
  for entry in leaf.sharding.spec:
    if entry is None:
      continue
    out += list(entry) if isinstance(entry, tuple) else [entry]
  return out


def roofline(stats: hlo_stats.ProgramStats, chip: chips_lib.Chip) -> dict:
  """Seconds for compute+memory (per op, the larger of the two) and for
  collectives (ring traffic over ICI / NVLink; a group that spans hosts at
  the chip's inter-host bandwidth, where it has one); the step is the
  larger of the two (collectives overlap the ops)."""
  def rate(dtype: str) -> float:
    if dtype in hlo_flops.INT_DTYPES:
      return chip.int8_ops
    return chip.f32_rate if dtype == "f32" else chip.bf16_flops

  ops_s = 0.0
  for op in stats.ops:
    compute = sum(f / rate(d) for d, f in op.flops.items())
    ops_s += op.count * max(compute, op.bytes / chip.hbm_bw)
  inter_bw = chip.dcn_bw or chip.ici_bw
  intra_s = stats.collective_bytes(traffic=True, inter_host=False) / chip.ici_bw
  inter_s = stats.collective_bytes(traffic=True, inter_host=True) / inter_bw
  collective_s = intra_s + inter_s
  compute_s = sum(f / rate(d) for d, f in stats.flops.items())
  return {"compute_s": compute_s, "hbm_s": stats.hbm_bytes / chip.hbm_bw,
          "ops_s": ops_s, "collective_s": collective_s,
          "intra_host_collective_s": intra_s,
          "inter_host_collective_s": inter_s,
          "step_s": max(ops_s, collective_s)}


def compile_step(config, devices):
  """(setup, compiled train step, seconds to compile) for `devices`
  (config: a RunConfig, or a ConfigDict parsed here)."""
  from bitnet_jax.training import run_setup
  setup = run_setup.build(config, devices)
  bits = setup.model_cfg.act_bits
  start = time.time()
  with setup.context():
    lowered = setup.steps[bits].lower(setup.abstract,
                                      run_setup.abstract_batch(setup.run,
                                                               setup.mesh))
    try:
      compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses what cannot fit
      text = str(e)
      if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        raise
      detail = next((l.strip() for l in text.splitlines() if l.strip()), text)
      raise MemoryError(f"the step does not fit: {detail[:300]}; raise "
                        "train.microbatches or use a larger slice") from None
  return setup, compiled, time.time() - start


def report(config, topology: str = "", num_slices: int = 1) -> dict[str, Any]:
  """Compile the step for `topology` (num_slices copies of it, joined along
  data parallelism: mesh.dcn_data) and return the per-chip report."""
  run = run_config.parse(config)
  if num_slices > 1:
    dcn = run.mesh.dcn_data
    if dcn not in (1, -1, num_slices):
      raise TopologyError(f"--num_slices={num_slices} but mesh.dcn_data={dcn}")
    run = run.replace(mesh=dataclasses.replace(run.mesh, dcn_data=num_slices))
  devices, chip = topology_devices(topology, num_slices)
  if gpu_topology.is_gpu_topology(topology) and not gpu_topology.cudnn_available():
    if run.model.for_platform(
        "gpu").attention_impl == "cudnn":
      raise TopologyError(
          f"--topology={topology}: cuDNN attention compiles with the cuDNN "
          "library: pip install -r requirements-gpu-compile.txt (or "
          "--config.model.attention_impl=xla)")
  setup, compiled, seconds = compile_step(run, devices)
  label = topology + (f" x {num_slices} slices" if num_slices > 1 else "")
  return summarize(setup, compiled, chip, label, seconds)


def by_dtype(stats: hlo_stats.ProgramStats) -> dict[str, float]:
  """Collective payload bytes per step by kind and element type ("all-gather
  s8"; the TPU compiler packs int8 gathers four to a u32; a combined
  collective counts each of its arrays)."""
  out: dict[str, float] = {}
  for c in stats.collectives:
    for dtype, nbytes in c.payload_by_dtype.items():
      key = f"{c.kind} {dtype}"
      out[key] = out.get(key, 0.0) + nbytes * c.count
  return out


def summarize(setup, compiled, chip: chips_lib.Chip | None,
              topology: str = "", seconds: float = 0.0) -> dict[str, Any]:
  devices = list(setup.mesh.devices.flat)
  n = len(devices)
  mem = compiled.memory_analysis()
  out: dict[str, Any] = {
      "topology": topology or f"{n} x {devices[0].device_kind}",
      "chip": chip.name if chip else devices[0].device_kind,
      "devices": n, "mesh": dict(setup.mesh.shape),
      "microbatches": setup.run.train.microbatches,
      "params": setup.params_total, "compile_s": round(seconds, 1),
      "argument_gib": mem.argument_size_in_bytes / GIB,
      "output_gib": mem.output_size_in_bytes / GIB,
      "alias_gib": mem.alias_size_in_bytes / GIB,
      "temp_gib": mem.temp_size_in_bytes / GIB,
  }
  out["total_gib"] = (out["argument_gib"] + out["output_gib"]
                      - out["alias_gib"] + out["temp_gib"])
  if chip:
    out["hbm_gib"] = chip.hbm_bytes / GIB
    out["usable_gib"] = chip.usable_bytes(os.environ) / GIB
    out["fits"] = out["total_gib"] <= out["usable_gib"]
  text = compiled.as_text()
  stats = hlo_stats.analyze(text, n, sharding.network_granules(devices))
  hosts = len(set(sharding.network_granules(devices)))
  tokens = setup.run.tokens_per_step / n
  model_fpt, needed_fpt = model_flops_per_token(setup)
  out.update(
      tokens_per_chip=tokens, model_flops=model_fpt * tokens,
      needed_flops=needed_fpt * tokens, program_flops=stats.matmul_flops,
      program_flops_by_dtype=stats.flops, hbm_bytes=stats.hbm_bytes,
      collectives=stats.by_kind(), collectives_by_dtype=by_dtype(stats),
      collective_payload=stats.collective_bytes(),
      zero3_payload=zero3_payload(setup),
      zero3_payload_by_axis=zero3_payload_by_axis(setup),
      unknown_trip_counts=stats.unknown_trip_counts,
      hosts=hosts, attention=hlo_flops.attention_kind(text),
      custom_calls=hlo_flops.call_sites(text), custom_call_costs=stats.custom_calls())
  if hosts > 1:
    out["intra_host_payload"] = stats.collective_bytes(inter_host=False)
    out["inter_host_payload"] = stats.collective_bytes(inter_host=True)
  if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
    dcn: dict[str, dict[str, float]] = {}
    for kind, _, nbytes in hlo_text.dcn_transfers(text):
      entry = dcn.setdefault(kind, {"sites": 0, "bytes": 0.0})
      entry["sites"] += 1
      entry["bytes"] += nbytes
    out["dcn_transfers"] = dcn
  if chip:
    est = roofline(stats, chip)
    est["mfu"] = out["model_flops"] / (est["step_s"] * chip.bf16_flops)
    est["tokens_per_s_per_chip"] = tokens / est["step_s"]
    out["estimate"] = est
  return out


def format_report(r: dict[str, Any]) -> str:
  g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
  lines = [
      f"dry run: {r['params'] / 1e9:.3f}B parameters, {r['topology']} "
      f"({r['devices']} x {r['chip']}), mesh {r['mesh']}, "
      f"{r['microbatches']} microbatch(es), compiled in {r['compile_s']} s",
      f"  memory per chip: arguments {r['argument_gib']:.2f} GiB, temporaries "
      f"{r['temp_gib']:.2f} GiB, total {r['total_gib']:.2f} GiB"
      + (f" of {r['hbm_gib']:.1f} GiB HBM" if "hbm_gib" in r else "")
      + (f" ({r['usable_gib']:.1f} GiB usable: XLA_PYTHON_CLIENT_MEM_FRACTION)"
         if r.get("usable_gib", r.get("hbm_gib")) != r.get("hbm_gib") else ""),
      f"  FLOPs per chip: program {r['program_flops']:.3e} (matmuls, loops "
      f"counted), model {r['model_flops']:.3e}, model + remat "
      f"{r['needed_flops']:.3e} (ratio {r['program_flops'] / r['needed_flops']:.2f})",
      f"  HBM traffic per chip (estimate): {g(r['hbm_bytes'])}",
  ]
  by = r.get("program_flops_by_dtype") or {}
  if sum(by.values()):
    lines.insert(3, "  matmul FLOPs by operand type: " + ", ".join(
        f"{k} {100 * v / sum(by.values()):.0f}%" for k, v in
        sorted(by.items(), key=lambda kv: -kv[1])))
  kinds = ", ".join(f"{k} {v['count']:.0f}x {g(v['payload_bytes'])}"
                    for k, v in sorted(r["collectives"].items())) or "none"
  lines.append(f"  collectives per chip: {kinds}; payload "
               f"{g(r['collective_payload'])}, needed (ZeRO-3 / data parallel) "
               f"{g(r['zero3_payload'])}")
  big = {k: v for k, v in r.get("collectives_by_dtype", {}).items()
         if v >= 0.01 * max(r["collective_payload"], 1.0)}
  if big:
    lines.append("  collective payload by element type: " + ", ".join(
        f"{k} {g(v)}" for k, v in sorted(big.items(), key=lambda kv: -kv[1])))
  if r.get("hosts", 1) > 1 and "inter_host_payload" in r:
    need = r.get("zero3_payload_by_axis", {})
    lines.append(
        f"  across {r['hosts']} hosts: payload {g(r['inter_host_payload'])} "
        f"between hosts (needed: the data-parallel gradient reduction "
        f"{g(need.get('data', 0.0))}), {g(r['intra_host_payload'])} within")
  if "attention" in r:
    lines.append(f"  attention: {r['attention']}" + "".join(
        f", {k} {v}x" for k, v in sorted(r.get("custom_calls", {}).items())))
  for name, c in sorted(r.get("custom_call_costs", {}).items()):
    lines.append(f"  custom call {name}: {c['count']:.0f} per step, "
                 f"{c['flops']:.3e} FLOPs, {g(c['bytes'])} HBM")
  if "dcn_transfers" in r:
    lines.append("  across slices (DCN), per chip and pass: " + (", ".join(
        f"{k.lower().replace('_', '-')} {v['sites']:.0f} sites {g(v['bytes'])}"
        for k, v in sorted(r["dcn_transfers"].items())) or "nothing"))
  if r["unknown_trip_counts"]:
    lines.append(f"  warning: loops counted once (no trip count): "
                 f"{r['unknown_trip_counts']}")
  est = r.get("estimate")
  if est:
    lines.append(
        f"  estimate (roofline, not a measurement): step {est['step_s']:.3f} s "
        f"(ops {est['ops_s']:.3f} s: compute {est['compute_s']:.3f}, HBM "
        f"{est['hbm_s']:.3f}; collectives {est['collective_s']:.3f} s"
        + (f": {est['intra_host_collective_s']:.3f} within hosts, "
           f"{est['inter_host_collective_s']:.3f} between"
           if r.get("hosts", 1) > 1 else "") + "), "
        f"{est['tokens_per_s_per_chip']:.0f} tokens/s/chip, MFU "
        f"{100 * est['mfu']:.1f}%")
  return "\n".join(lines)


def check_fits(r: dict[str, Any]) -> None:
  if r.get("fits") is False:
    raise MemoryError(
        f"needs {r['total_gib']:.1f} GiB per chip, the chip has "
        f"{r.get('usable_gib', r['hbm_gib']):.1f} GiB for it; raise "
        "train.microbatches or use a larger slice")


def write_json(r: dict[str, Any], path: str) -> None:
  with open(path, "w") as f:
    json.dump(r, f, indent=2, default=float)


def run(config, topology: str = "", json_path: str = "",
        num_slices: int = 1) -> dict:
  """`train --dry_run`: compile the train step from shapes for `topology`,
  print the per-chip report (and write it as JSON); a step that does not fit
  is an error."""
  try:
    result = report(config, topology, num_slices)
  except MemoryError as e:
    raise UserError(str(e)) from None
  print(format_report(result))
  if json_path:
    write_json(result, json_path)
  try:
    check_fits(result)
  except MemoryError as e:
    raise UserError(str(e)) from None
  return result
