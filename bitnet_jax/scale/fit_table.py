"""`python -m bitnet_jax.scale.fit_table`: which paper config fits which TPU
slice or GPU cluster.

For each paper config (configs/bitnet_v2_{400m,1p3b,3b,7b}.py, the paper's
512 x 2048 batch) and each topology, compiles the real train step for it
(libtpu or the CUDA plugin, no accelerator needed; see dry_run.py) with 1, 2,
4, ... microbatches until it fits the chip's HBM, and records the per-chip
memory, the microbatches needed and the roofline MFU estimate. GPU cells also
compile the fp baseline and v2 with int8 training matmuls at the same
microbatches, for the v2 / fp step ratio (and v2 int8 with the jnp stages
instead of the fused input kernel, for what the kernel saves). Each result is cached as JSON in
--cache_dir, so an interrupted run resumes; the table is written to --out
and, with --readme, copied between docs/scale.md's fit-table markers (TPU and
GPU tables have their own).

  python -m bitnet_jax.scale.fit_table --topologies=v5p:4x4x4,v5e:16x16 \
      --out=docs/fit_table.md --readme=docs/scale.md
  python -m bitnet_jax.scale.fit_table --topologies=h100:8,h100:8x8,b200:8 \
      --out=docs/gpu_fit_table.md --cache_dir=docs/gpu_fit_table --readme=docs/scale.md
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

from bitnet_jax import cli
from bitnet_jax.experiments import readme_sync

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["400m", "1p3b", "3b", "7b"], "Paper sizes.")
flags.DEFINE_list("topologies", ["v5p:2x4x4", "v5p:4x4x4", "v5e:8x8",
                                 "v5e:16x16"], "libtpu topologies.")
flags.DEFINE_string("out", "docs/fit_table.md", "The markdown table.")
flags.DEFINE_string("cache_dir", "docs/fit_table", "One JSON report per cell.")
flags.DEFINE_string("readme", "", "Also copy the table into this file (between "
                    "its fit-table markers: docs/scale.md).")
flags.DEFINE_integer("max_microbatches", 16, "Give up beyond this.")

BEGIN, END = "<!-- fit-table:begin -->", "<!-- fit-table:end -->"
GPU_BEGIN, GPU_END = "<!-- gpu-fit-table:begin -->", "<!-- gpu-fit-table:end -->"


def load_config(size: str):
  """A paper config as a user runs it (quant.train_matmul=auto: int8
  training matmuls on TPU)."""
  import importlib.util
  from bitnet_jax import config_files
  path = config_files.resolve(f"configs/bitnet_v2_{size}.py")
  spec = importlib.util.spec_from_file_location(f"bitnet_v2_{size}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def fit(size: str, topology: str, max_microbatches: int) -> dict:
  """The smallest power-of-two microbatch count that fits, with its report;
  on GPUs also the estimated step of the fp baseline and of v2 with int8
  training matmuls, compiled the same way."""
  from bitnet_jax.scale import dry_run, gpu_topology
  devices, _ = dry_run.topology_devices(topology)
  k, last = 1, None
  while k <= max_microbatches:
    config = load_config(size)
    config.mesh.update(data=1, fsdp=-1, tensor=1)  # per slice / host
    config.train.microbatches = k
    if config.data.batch_size % (len(devices) * k):
      break
    try:
      r = dry_run.report(config, topology)
    except MemoryError as e:
      last = {"error": str(e)}
    else:
      if r.get("fits"):
        if gpu_topology.is_gpu_topology(topology):
          r["variants"] = variant_steps(size, topology, k)
        return r
      last = r
    k *= 2
  return {"fits": False, "topology": topology, "last": last}


def variant_steps(size: str, topology: str, microbatches: int) -> dict:
  """Estimated step seconds of fp, v2 (float matmuls), v2 (int8 matmuls:
  with the fused input kernel, and with the jnp stages)."""
  from bitnet_jax.scale import dry_run
  out = {}
  for name, variant, matmul, kernel in (
      ("fp", "fp", "float", ""), ("v2_float", "v2", "float", ""),
      ("v2_int8", "v2", "int8", ""), ("v2_int8_stages", "v2", "int8", "jnp")):
    config = load_config(size)
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.train.microbatches = microbatches
    config.model.variant = variant
    config.quant.train_matmul = matmul
    config.quant.input_kernel = kernel
    r = dry_run.report(config, topology)
    out[name] = {"step_s": r["estimate"]["step_s"], "total_gib": r["total_gib"],
                 "mfu": r["estimate"]["mfu"]}
  return out


def cell(size: str, topology: str, cache_dir: str, max_microbatches: int) -> dict:
  path = os.path.join(cache_dir, f"{size}_{topology.replace(':', '_')}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  r = fit(size, topology, max_microbatches)
  os.makedirs(cache_dir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(r, f, indent=2, default=float)
  os.replace(path + ".tmp", path)
  return r


def table(results: dict[tuple[str, str], dict], gpu: bool = False) -> str:
  if gpu:
    return gpu_table(results)
  rows = ["| config | slice | chips | microbatches | GiB per chip (HBM) | "
          "FLOPs: program / model+remat | collectives / ZeRO-3 | "
          "est. step (s) | est. tokens/s/chip | est. MFU |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for (size, topology), r in results.items():
    if not r.get("fits"):
      rows.append(f"| {size} | {topology} | | does not fit | | | | | | |")
      continue
    est = r["estimate"]
    rows.append(
        f"| {size} | {topology} | {r['devices']} | {r['microbatches']} | "
        f"{r['total_gib']:.1f} ({r['hbm_gib']:.0f}) | "
        f"{r['program_flops'] / r['needed_flops']:.2f} | "
        f"{r['collective_payload'] / r['zero3_payload']:.2f} | "
        f"{est['step_s']:.2f} | {est['tokens_per_s_per_chip']:,.0f} | "
        f"{100 * est['mfu']:.0f}% |")
  return "\n".join(rows) + "\n"


def gpu_table(results: dict[tuple[str, str], dict]) -> str:
  rows = ["| config | GPUs | count | microbatches | GiB per GPU (HBM) | "
          "FLOPs: program / model+remat | collectives within hosts / needed | "
          "between hosts / needed | attention | est. step (s) | "
          "est. tokens/s/GPU | est. MFU | v2 / fp step: float, int8 matmuls "
          "(fused input kernel), int8 (jnp stages) |",
          "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
  for (size, topology), r in results.items():
    if not r.get("fits"):
      rows.append(f"| {size} | {topology} | | does not fit |" + " |" * 9)
      continue
    est, need = r["estimate"], r["zero3_payload_by_axis"]
    if r.get("hosts", 1) > 1:
      within = r["intra_host_payload"] / max(need["fsdp"], 1.0)
      between = (f"{r['inter_host_payload'] / 2**30:.2f} GiB / "
                 f"{need['data'] / 2**30:.2f}")
    else:
      within, between = r["collective_payload"] / r["zero3_payload"], "-"
    v = r.get("variants", {})
    ratio = ", ".join(f"{v[k]['step_s'] / v['fp']['step_s']:.2f}"
                      for k in ("v2_float", "v2_int8", "v2_int8_stages")
                      if k in v)
    rows.append(
        f"| {size} | {topology} | {r['devices']} | {r['microbatches']} | "
        f"{r['total_gib']:.1f} ({r['hbm_gib']:.0f}) | "
        f"{r['program_flops'] / r['needed_flops']:.2f} | {within:.2f} | "
        f"{between} | {r.get('attention', '')} | {est['step_s']:.2f} | "
        f"{est['tokens_per_s_per_chip']:,.0f} | {100 * est['mfu']:.0f}% | "
        f"{ratio} |")
  return "\n".join(rows) + "\n"


def main(argv):
  del argv
  from bitnet_jax.scale import gpu_topology
  gpu = all(gpu_topology.is_gpu_topology(t) for t in FLAGS.topologies)
  results = {}
  for size in FLAGS.configs:
    for topology in FLAGS.topologies:
      r = cell(size, topology, FLAGS.cache_dir, FLAGS.max_microbatches)
      results[(size, topology)] = r
      print(f"{size} on {topology}: " + (
          f"{r['microbatches']} microbatch(es), {r['total_gib']:.1f} GiB, "
          f"est. MFU {100 * r['estimate']['mfu']:.0f}%" if r.get("fits")
          else "does not fit"), flush=True)
  text = table(results, gpu)
  with open(FLAGS.out, "w") as f:
    f.write(text)
  if FLAGS.readme:
    readme_sync.replace_section(FLAGS.readme, *((GPU_BEGIN, GPU_END) if gpu
                                                else (BEGIN, END)), text)
  sys.stdout.write(text)


if __name__ == "__main__":
  cli.run(main)
