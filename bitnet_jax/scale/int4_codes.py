"""`python -m bitnet_jax.scale.int4_codes`: would native 4-bit codes
(jnp.int4 activations, int2 ternary weights) make the a4 step cheaper on
TPU than the int8 codes it uses?

Compiles one a4 H-BitLinear product at the 7B's per-chip W_down shape
(16384 tokens x d_ff 16384 -> d_model 4096: 8 sequences of 2048 per chip)
as s8 x s8, s4 x s4 and s4 x s2 -> s32 dots for each TPU generation (the
TPU compiler from this host, no TPU) and prints the compiler's own time
estimate and the roofline's bytes side by side. Not a test: a compiled
estimate, to decide with (docs/scale.md, "Native 4-bit codes").
"""
from __future__ import annotations

from absl import flags

from bitnet_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs: fit_table has its own
  --topologies)."""
  flags.DEFINE_list("topologies", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"],
                    "libtpu topologies (one chip of each is used).")
  flags.DEFINE_list("shape", ["16384", "16384", "4096"],
                    "tokens, in features, out features.")


CODES = (("int8", "int8"), ("int4", "int4"), ("int4", "int2"))


def compare(topology: str, m: int, k: int, n: int) -> list[dict]:
  """One row per codes pair: the compiler's estimated seconds and bytes,
  the roofline's HBM bytes and each time over the int8 one."""
  import jax
  import jax.numpy as jnp
  from bitnet_jax.scale import dry_run, hlo_stats
  devices, _ = dry_run.topology_devices(topology)
  sh = jax.sharding.SingleDeviceSharding(devices[0])
  dot = jax.jit(lambda a, b: jax.lax.dot(a, b,
                                         preferred_element_type=jnp.int32))
  rows = []
  for x_dtype, w_dtype in CODES:
    compiled = dot.lower(
        jax.ShapeDtypeStruct((m, k), jnp.dtype(x_dtype), sharding=sh),
        jax.ShapeDtypeStruct((k, n), jnp.dtype(w_dtype), sharding=sh)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    rows.append({"topology": topology, "codes": f"{x_dtype} x {w_dtype}",
                 "compiler_s": float(cost["optimal_seconds"]),
                 "compiler_bytes": float(cost["bytes accessed"]),
                 "hbm_bytes": hlo_stats.analyze(compiled.as_text(),
                                                1).hbm_bytes})
  for row in rows:
    row["x_int8_time"] = row["compiler_s"] / rows[0]["compiler_s"]
  return rows


def main(argv):
  del argv
  m, k, n = (int(v) for v in FLAGS.shape)
  print("| chip | codes | compiler's estimate (ms) | x int8 | bytes (MiB) |")
  print("|---|---|---:|---:|---:|")
  for topology in FLAGS.topologies:
    for r in compare(topology, m, k, n):
      print(f"| {topology.split(':')[0]} | {r['codes']} | "
            f"{1e3 * r['compiler_s']:.2f} | {r['x_int8_time']:.2f} | "
            f"{r['hbm_bytes'] / 2**20:.0f} |")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
