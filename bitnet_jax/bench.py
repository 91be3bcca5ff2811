"""`python -m bitnet_jax.bench`: speed ratios measured side by side in one run.

Every row is a ratio of two timings taken in the same process, interleaved
round by round (so drift in machine load hits both), medians of --rounds.
Sections (--only=a,b to pick):
  hadamard   fwht (each block size) vs a same-shape elementwise pass
  quant      each quantizer vs the same elementwise pass
  train      the tiny config's train step of every variant vs the `fp` step
  data       the pipeline's tokens/s (both packings) vs the tiny trainer's
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


def _train_steps(small: bool):
  """Jitted tiny-config train steps of each variant on one fixed batch."""
  from bitnet_jax import defaults, optimizer, train_step
  from bitnet_jax.model import ModelConfig, Transformer
  config = defaults.tiny_config()
  if small:
    config.model.update(d_model=64, d_ff=192, num_layers=2, seq_len=64)
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      0, config.model.vocab_size,
      (config.data.batch_size, config.model.seq_len + 1)), jnp.int32)
  fns = {}
  variants = ((("fp", 8), ("v2", 8)) if small else
              (("fp", 8), ("b1.58", 8), ("v2", 8), ("v2", 4), ("a4.8", 4)))
  for variant, bits in variants:
    config.model.variant, config.quant.act_bits = variant, bits
    model = Transformer(ModelConfig.from_config(config))
    tx = optimizer.make_optimizer(config.opt, config.train.num_steps)
    state = jax.jit(train_step.unboxed_init(model, tx))(jax.random.PRNGKey(0))
    step = jax.jit(train_step.make_train_step(model, tx))
    name = f"{variant} a{bits}" if variant != "fp" else "fp"
    fns[name] = functools.partial(lambda f, st: f(st, {"tokens": tokens})[1],
                                  step, state)
  return fns, tokens.shape[0] * (tokens.shape[1] - 1)


def bench_train(rounds: int, small: bool):
  fns, _ = _train_steps(small)
  t = time_interleaved(fns, max(rounds, 15))
  return [("tiny config step", k, v * 1e3, v / t["fp"]) for k, v in t.items()
          if k != "fp"], "x fp step"


def bench_data(rounds: int, small: bool):
  """Pipeline tokens/s on the embedded corpus vs the tiny v2 trainer's."""
  from bitnet_jax import corpus, data, defaults, tokenizer
  config = defaults.tiny_config()
  split = corpus.load_corpus(config.data)
  tok = tokenizer.train_tokenizer(split.train[::4][:1000], config.model.vocab_size)
  fns, tokens_per_step = _train_steps(small)
  step_time = time_interleaved({"v2 a8": fns["v2 a8"]}, max(rounds, 5))["v2 a8"]
  trainer_rate = tokens_per_step / step_time
  rows = [("tiny config", "trainer (v2 a8 step)", trainer_rate, 1.0)]
  for packing in ("concat", "first_fit"):
    config.data.packing = packing
    it = iter(data.train_dataset(split.train, tok, config.data,
                                 seq_len=config.model.seq_len, seed=0))
    rate = data.measure_throughput(it, 20 if small else 200)
    rows.append(("tiny config", f"pipeline {packing}", rate, rate / trainer_rate))
  return rows, "x trainer", "tokens/s"


SECTIONS: dict[str, Callable] = {
    "hadamard": bench_hadamard,
    "quant": bench_quant,
    "train": bench_train,
    "data": bench_data,
}


def print_table(section: str, rows, ratio_label: str = "x elementwise",
                value_label: str = "ms"):
  print(f"\n## {section}")
  print(f"| shape | candidate | {value_label} | {ratio_label} |")
  print("|---|---|---:|---:|")
  for shape, cand, value, ratio in rows:
    print(f"| {shape} | {cand} | {value:,.1f} | {ratio:.2f} |")


def main(argv):
  del argv
  print(f"bitnet_jax bench: jax {jax.__version__}, backend "
        f"{jax.default_backend()}, devices {jax.device_count()}, "
        f"rounds {FLAGS.rounds}")
  for name, fn in SECTIONS.items():
    if FLAGS.only and name not in FLAGS.only:
      continue
    result = fn(FLAGS.rounds, FLAGS.small)
    if isinstance(result, tuple):  # (rows, ratio label[, value label])
      print_table(name, *result)
    else:
      print_table(name, result)


if __name__ == "__main__":
  app.run(main)
