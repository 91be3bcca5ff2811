"""`python -m bitnet_jax.bench`: speed ratios measured side by side in one run.

Every row is a ratio of two timings taken in the same process, interleaved
round by round (so drift in machine load hits both), medians of --rounds.
Sections (--only=a,b to pick):
  hadamard   fwht (each block size) vs a same-shape elementwise pass
  quant      each quantizer vs the same elementwise pass
Other modules add sections as the framework grows (data, train, inference).
A benchmark is not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import hadamard, quant

FLAGS = flags.FLAGS
flags.DEFINE_list("only", [], "Sections to run (default: all).")
flags.DEFINE_integer("rounds", 7, "Timed rounds per candidate (median kept).")
flags.DEFINE_bool("small", False, "Small shapes (a quick smoke run).")


def time_interleaved(fns: dict[str, Callable[[], object]],
                     rounds: int) -> dict[str, float]:
  """Median seconds per call of each thunk, measured round-robin."""
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile and warm up
  samples = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(s) for name, s in samples.items()}


def _elementwise(x):
  return x * 2 + 1


def bench_hadamard(rounds: int, small: bool) -> list[tuple[str, str, float, float]]:
  rows = []
  shapes = [(256, 1024)] if small else [(4096, 4096), (2048, 16384)]
  for shape in shapes:
    for dtype in (jnp.float32, jnp.bfloat16):
      x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)
      fns = {"elementwise": functools.partial(jax.jit(_elementwise), x)}
      for block in (2, 16, 64, 128):
        f = jax.jit(functools.partial(hadamard.fwht, block_size=block))
        fns[f"fwht block={block}"] = functools.partial(f, x)
      t = time_interleaved(fns, rounds)
      base = t["elementwise"]
      name = f"[{shape[0]}, {shape[1]}] {jnp.dtype(dtype).name}"
      for k, v in t.items():
        if k != "elementwise":
          rows.append((name, k, v * 1e3, v / base))
  return rows


def bench_quant(rounds: int, small: bool) -> list[tuple[str, str, float, float]]:
  rows = []
  shape = (256, 1024) if small else (4096, 4096)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  fns = {
      "elementwise": jax.jit(_elementwise),
      "quantize_weights_ternary": jax.jit(quant.quantize_weights_ternary),
      "quantize_activations_int8": jax.jit(quant.quantize_activations_int8),
      "quantize_activations_int4": jax.jit(quant.quantize_activations_int4),
      "sparsify_topk(0.5)": jax.jit(lambda v: quant.sparsify_topk(v, 0.5)),
  }
  t = time_interleaved({k: functools.partial(f, x) for k, f in fns.items()},
                       rounds)
  for k, v in t.items():
    if k != "elementwise":
      rows.append((f"[{shape[0]}, {shape[1]}] float32", k, v * 1e3,
                   v / t["elementwise"]))
  return rows


SECTIONS: dict[str, Callable] = {
    "hadamard": bench_hadamard,
    "quant": bench_quant,
}


def print_table(section: str, rows, ratio_label: str = "x elementwise"):
  print(f"\n## {section}")
  print(f"| shape | candidate | ms | {ratio_label} |")
  print("|---|---|---:|---:|")
  for shape, cand, ms, ratio in rows:
    print(f"| {shape} | {cand} | {ms:.1f} | {ratio:.2f} |")


def main(argv):
  del argv
  print(f"bitnet_jax bench: jax {jax.__version__}, backend "
        f"{jax.default_backend()}, devices {jax.device_count()}, "
        f"rounds {FLAGS.rounds}")
  for name, fn in SECTIONS.items():
    if FLAGS.only and name not in FLAGS.only:
      continue
    result = fn(FLAGS.rounds, FLAGS.small)
    if isinstance(result, tuple):  # (rows, ratio label)
      print_table(name, *result)
    else:
      print_table(name, result)


if __name__ == "__main__":
  app.run(main)
