"""`python -m bitnet_jax.scale.gpu_measure --out=gpu_measure.json [--rounds=10]`: what only a
GPU can show, in one command (under 8 minutes on one H100 / H200).

Not a test (nothing is asserted); every number is measured side by side in
one process, timings interleaved round by round (bench.time_interleaved),
medians. Writes one JSON and prints a short table:

  train     the step of a 400M-wide (d 1024, 16 heads, d_ff 4096), 4-layer
            model at 16 x 2048 tokens: fp / v2 float / v2 int8 training
            matmuls (with the fused input kernel, and with the jnp stages),
            XLA vs cuDNN attention; measured step and MFU next to
            the dry run's roofline estimate of the same compiled program
            (dry_run.summarize), and each step / the fp step with the same
            attention
  fwht      the 4096-point Hadamard of [32768, 4096] bf16 vs a same-size
            copy (x * 1 + 0 through HBM)
  kernel    the fused H-BitLinear input (kernels/h_input_triton.py: RMSNorm
            -> Hadamard -> int8 codes, and its backward) on [32768, 4096]
            bf16 vs the jnp stages it replaces, and vs its own HBM bytes at
            the GPU's bandwidth (its roofline)
  gemm      [16384, 4096] x [4096, 4096]: int8 -> int32 vs bf16 -> f32
  decode    the 4-layer v2 model exported as int8 codes vs the bf16 fp model:
            decode tokens/s at batch 1, 8, 64 (bench's decoder)

--small runs every section at toy sizes on any backend (CPU included), so a
test can check the script end to end; its numbers mean nothing.
"""
from __future__ import annotations

import functools
import json
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import bench, cli, hadamard
from bitnet_jax.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "gpu_measure.json", "Where the JSON goes.")
# --rounds, --only and --small (toy sizes, any backend) are bench's flags.

# (variant, training matmul, H-BitLinear input: '' = by backend | jnp, attention)
TRAIN_CASES = (("fp", "float", "", "xla"), ("fp", "float", "", "cudnn"),
               ("v2", "float", "", "xla"), ("v2", "float", "", "cudnn"),
               ("v2", "int8", "", "cudnn"), ("v2", "int8", "jnp", "cudnn"))


def train_config(variant: str, matmul: str, kernel: str, attention: str,
                 smoke: bool):
  from bitnet_jax import defaults
  config = defaults.paper_config("400m", act_bits=8)  # configs/bitnet_v2_400m.py
  config.model.update(num_layers=4, variant=variant, attention_impl=attention)
  config.quant.train_matmul = matmul
  config.quant.input_kernel = kernel
  config.mesh.update(data=1, fsdp=1, tensor=1, dcn_data=1)
  config.data.batch_size = 16
  if smoke:
    config.model.update(num_layers=2, d_model=128, d_ff=256, num_heads=2,
                        vocab_size=512, seq_len=64, dtype="float32")
    config.data.batch_size = 2
  return config


def compile_case(config, device, chip):
  """(a no-argument call of the compiled train step, its report row)."""
  from bitnet_jax.data.batch import Batch
  from bitnet_jax.model import Transformer
  from bitnet_jax.scale import dry_run
  from bitnet_jax.training import run_setup
  from bitnet_jax.training import train_step as step_lib
  setup = run_setup.build(config, [device])
  model = Transformer(setup.model_cfg)
  state = jax.jit(step_lib.unboxed_init(model, setup.tx))(
      jax.random.PRNGKey(0))
  tokens = Batch(jnp.asarray(np.random.default_rng(0).integers(
      0, config.model.vocab_size,
      (config.data.batch_size, config.model.seq_len + 1)), jnp.int32))
  compiled = jax.jit(step_lib.make_train_step(model, setup.tx)).lower(
      state, tokens).compile()
  r = dry_run.summarize(setup, compiled, chip, "1 device")
  return (functools.partial(lambda f, s, b: f(s, b)[1], compiled, state,
                            tokens),
          {"model_flops": r["model_flops"], "attention": r["attention"],
           "estimate_s": r.get("estimate", {}).get("step_s"),
           "temp_gib": r["temp_gib"]})


def measure_train(rounds: int, smoke: bool) -> dict:
  from bitnet_jax import chips
  device = jax.devices()[0]
  chip = chips.for_device_kind(device.device_kind)
  fns, out, same = {}, {}, {}  # same: row -> the row that ran its program
  first: dict[tuple, str] = {}
  for variant, matmul, kernel, attention in TRAIN_CASES:
    stages = "+stages" if kernel == "jnp" else ""
    name = f"{variant} {matmul}{stages} {attention}"
    if smoke and attention == "cudnn" and device.platform != "gpu":
      attention = "xla"  # the row keeps its name; "attention" says what ran
    case = (variant, matmul, kernel, attention)
    if case in first:  # off a GPU the cudnn rows run XLA's: compiled once
      same[name] = first[case]
      continue
    first[case] = name
    fns[name], out[name] = compile_case(
        train_config(variant, matmul, kernel, attention, smoke), device, chip)
  times = bench.time_interleaved(fns, rounds)
  for name, ran in same.items():
    out[name], times[name] = dict(out[ran]), times[ran]
  for name, t in times.items():
    row = out[name]
    row["step_s"] = t
    row["x_fp_step"] = t / times["fp float " + name.split()[-1]]  # same attention
    if chip:
      row["mfu"] = row["model_flops"] / (t * chip.bf16_flops)
  return out


def measure_fwht(rounds: int, smoke: bool) -> dict:
  rows, n = (256, 256) if smoke else (32768, 4096)
  x = jax.random.normal(jax.random.PRNGKey(1), (rows, n), jnp.bfloat16)
  fwht = jax.jit(hadamard.fwht)
  copy = jax.jit(lambda a: a * 1 + 0)
  t = bench.time_interleaved({"fwht": functools.partial(fwht, x),
                              "copy": functools.partial(copy, x)}, rounds)
  moved = 2 * x.size * x.dtype.itemsize  # read + write, once
  return {"shape": [rows, n], "fwht_s": t["fwht"], "copy_s": t["copy"],
          "x_copy": t["fwht"] / t["copy"],
          "copy_bytes_per_s": moved / t["copy"]}


def measure_kernel(rounds: int, smoke: bool) -> dict:
  from bitnet_jax import chips, layers, quant
  from bitnet_jax.kernels import h_input
  rows, n = (64, 256) if smoke else (32768, 4096)
  device = jax.devices()[0]
  impl = "triton" if device.platform == "gpu" else "triton_interpret"
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((rows, n)), jnp.bfloat16)
  dz = jnp.asarray(rng.standard_normal((rows, n)), jnp.bfloat16)
  s = jnp.ones((n,), jnp.float32)

  norm = layers.RMSNorm(1e-5)

  def rotated(x, s):  # what layers.BitLinear runs without the kernel
    return hadamard.fwht(norm.apply({"params": {"scale": s}}, x))
  stages = lambda x, s: quant.activation_codes(rotated(x, s), 8)
  stages_bwd = jax.jit(jax.grad(lambda x, s, dz: jnp.sum(
      rotated(x, s).astype(jnp.float32) * dz), (0, 1)))
  fns = {
      "kernel_fwd": functools.partial(jax.jit(functools.partial(
          h_input.quantized_input, bits=8, eps=1e-5, impl=impl)), x, s),
      "stages_fwd": functools.partial(jax.jit(stages), x, s),
      "kernel_bwd": functools.partial(jax.jit(functools.partial(
          h_input.input_grads, eps=1e-5, impl=impl)), x, s, dz),
      "stages_bwd": functools.partial(stages_bwd, x, s, dz)}
  t = bench.time_interleaved(fns, rounds)
  out = {"shape": [rows, n], "impl": impl, **{k + "_s": v for k, v in t.items()},
         "fwd_x_stages": t["kernel_fwd"] / t["stages_fwd"],
         "bwd_x_stages": t["kernel_bwd"] / t["stages_bwd"]}
  chip = chips.for_device_kind(device.device_kind)
  if chip:  # the kernel's own roofline: its HBM bytes at the bandwidth
    fwd_bytes, bwd_bytes = rows * n * (2 + 1), rows * n * (2 + 2 + 2)
    out["fwd_x_roofline"] = t["kernel_fwd"] / (fwd_bytes / chip.hbm_bw)
    out["bwd_x_roofline"] = t["kernel_bwd"] / (bwd_bytes / chip.hbm_bw)
  return out


def measure_gemm(rounds: int, smoke: bool) -> dict:
  m, k, n = (256, 256, 256) if smoke else (16384, 4096, 4096)
  rng = np.random.default_rng(2)
  a8 = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
  b8 = jnp.asarray(rng.integers(-1, 2, (k, n)), jnp.int8)
  a16, b16 = a8.astype(jnp.bfloat16), b8.astype(jnp.bfloat16)
  int8 = jax.jit(lambda a, b: jax.lax.dot(a, b,
                                          preferred_element_type=jnp.int32))
  bf16 = jax.jit(lambda a, b: jax.lax.dot(a, b,
                                          preferred_element_type=jnp.float32))
  t = bench.time_interleaved({"int8": functools.partial(int8, a8, b8),
                              "bf16": functools.partial(bf16, a16, b16)}, rounds)
  flops = 2.0 * m * k * n
  return {"shape": [m, k, n], "int8_s": t["int8"], "bf16_s": t["bf16"],
          "int8_ops_per_s": flops / t["int8"],
          "bf16_flops_per_s": flops / t["bf16"],
          "bf16_over_int8": t["bf16"] / t["int8"]}


def measure_decode(rounds: int, smoke: bool) -> dict:
  rows, _, _ = bench.bench_decode(rounds, smoke)
  return {f"{section}: {name}": value for section, name, value, _ in rows}


SECTIONS = {"train": measure_train, "fwht": measure_fwht,
            "kernel": measure_kernel, "gemm": measure_gemm,
            "decode": measure_decode}


def main(argv):
  del argv
  wanted = FLAGS.only or list(SECTIONS)
  unknown = sorted(set(wanted) - set(SECTIONS))
  if unknown:
    raise InputError(f"--only: unknown sections {unknown}; the sections "
                         f"are {', '.join(SECTIONS)}")
  device = jax.devices()[0]
  result = {"device": device.device_kind, "platform": device.platform,
            "jax": jax.__version__, "small": FLAGS.small}
  for name in wanted:
    print(f"measuring {name} ...", flush=True)
    result[name] = SECTIONS[name](FLAGS.rounds, FLAGS.small)
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=2, default=float)
  for name, row in result.get("train", {}).items():
    est = row["estimate_s"]
    sys.stdout.write(
        f"train {name:18s} {1e3 * row['step_s']:8.2f} ms  x fp "
        f"{row['x_fp_step']:.2f}" + (f"  MFU {100 * row['mfu']:.1f}%"
                                     if "mfu" in row else "")
        + (f"  estimate {1e3 * est:.2f} ms" if est else "") + "\n")
  if "fwht" in result:
    sys.stdout.write(f"fwht x copy {result['fwht']['x_copy']:.2f}\n")
  if "kernel" in result:
    k = result["kernel"]
    sys.stdout.write(f"input kernel x jnp stages: forward {k['fwd_x_stages']:.2f}"
                     f", backward {k['bwd_x_stages']:.2f}\n")
  if "gemm" in result:
    sys.stdout.write(f"gemm bf16 / int8 time {result['gemm']['bf16_over_int8']:.2f}\n")
  sys.stdout.write(f"wrote {FLAGS.out}\n")


if __name__ == "__main__":
  cli.run(main)
