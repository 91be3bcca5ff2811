"""`python -m bitnet_jax.bench`: speed ratios measured side by side in one run.

Every row is a ratio of two timings taken in the same process, interleaved
round by round (so drift in machine load hits both), medians of --rounds.
Sections (--only=a,b to pick):
  hadamard   fwht (each block size) vs a same-shape elementwise pass
  quant      each quantizer vs the same elementwise pass
  train      the tiny config's train step of every variant vs the `fp` step,
             with float and integer (quant.train_matmul=int8) matmuls
  data       the pipeline's tokens/s (both packings) vs the tiny trainer's
  decode     exported ternary model (int8 codes; 2-bit packed) vs the same
             size float model in bf16: decode tokens/s at batch 1, 8, 64
             (16 cached steps per call), prefill tokens/s, and the compiled
             step's memory (arguments + temporaries)
A benchmark is not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import cli, hadamard, quant
from bitnet_jax import defaults
from bitnet_jax.data import corpus
from bitnet_jax.data import pipeline as data
from bitnet_jax.data import tokenizer
from bitnet_jax.data.batch import Batch
from bitnet_jax.inference import exported as export
from bitnet_jax.model import ModelConfig, Transformer
from bitnet_jax.run_config import RunConfig
from bitnet_jax.training import optimizer
from bitnet_jax.training import train_step

FLAGS = flags.FLAGS
flags.DEFINE_list("only", [], "Sections to run (default: all).")
flags.DEFINE_integer("rounds", 7, "Timed rounds per candidate (median kept).")
flags.DEFINE_bool("small", False, "Small shapes (a quick smoke run).")


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int,
                     clock: Callable[[], float] = time.perf_counter
                     ) -> dict[str, float]:
  """Median seconds per call of each thunk, measured round-robin."""
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile and warm up
  samples = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = clock()
      jax.block_until_ready(fn())
      samples[name].append(clock() - start)
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
  config = defaults.tiny_config()
  if small:
    config.model.update(d_model=64, d_ff=192, num_layers=2, seq_len=64)
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      0, config.model.vocab_size,
      (config.data.batch_size, config.model.seq_len + 1)), jnp.int32)
  fns = {}
  variants = ((("fp", 8, "float"), ("v2", 8, "float"), ("v2", 8, "int8"))
              if small else
              (("fp", 8, "float"), ("b1.58", 8, "float"), ("v2", 8, "float"),
               ("v2", 4, "float"), ("a4.8", 4, "float"), ("b1.58", 8, "int8"),
               ("v2", 8, "int8"), ("v2", 4, "int8"), ("a4.8", 4, "int8")))
  for variant, bits, matmul in variants:
    config.model.variant, config.quant.act_bits = variant, bits
    config.quant.train_matmul = matmul
    run = RunConfig.from_config(config)
    model = Transformer(run.model)
    tx = optimizer.make_optimizer(run.opt, run.train.num_steps)
    state = jax.jit(train_step.unboxed_init(model, tx))(jax.random.PRNGKey(0))
    step = jax.jit(train_step.make_train_step(model, tx))
    name = (f"{variant} a{bits}" + (" int8 matmul" if matmul == "int8" else "")
            if variant != "fp" else "fp")
    fns[name] = functools.partial(lambda f, st: f(st, Batch(tokens))[1],
                                  step, state)
  return fns, tokens.shape[0] * (tokens.shape[1] - 1)


def bench_train(rounds: int, small: bool):
  fns, _ = _train_steps(small)
  t = time_interleaved(fns, rounds if small else max(rounds, 15))
  return [("tiny config step", k, v * 1e3, v / t["fp"]) for k, v in t.items()
          if k != "fp"], "x fp step"


def bench_data(rounds: int, small: bool):
  """Pipeline tokens/s on the embedded corpus vs the tiny v2 trainer's."""
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


def _decode_models(small: bool):
  """(name -> (ModelConfig, params)) for the decode bench: one random v2 model
  exported as int8 codes and as packed codes, and the fp model of the same
  size with bf16 weights."""
  import flax.linen as nn
  dims = (dict(d_model=128, d_ff=384, num_heads=2, num_layers=2) if small else
          dict(d_model=1024, d_ff=3072, num_heads=8, num_layers=4))
  base = ModelConfig(vocab_size=4096, seq_len=256, dtype="bfloat16", **dims)
  tokens = jnp.zeros((1, 8), jnp.int32)
  latent = nn.meta.unbox(jax.jit(Transformer(base).init)(jax.random.PRNGKey(0),
                                                         tokens)["params"])
  models = {}
  for weights in ("int8", "packed"):
    models[f"ternary {weights}"] = (base.replace(weights=weights),
                                    export.inference_params(latent, base, weights))
  fp = base.replace(variant="fp")
  fp_params = nn.meta.unbox(jax.jit(Transformer(fp).init)(jax.random.PRNGKey(0),
                                                          tokens)["params"])
  models["bf16"] = (fp, jax.tree.map(lambda p: p.astype(jnp.bfloat16), fp_params))
  return models


def _decoder_fn(cfg, batch: int, steps: int, prompt: int):
  model = Transformer(cfg, decode_len=prompt + steps)

  def prefill(params, tokens):
    return model.apply({"params": params}, tokens, mutable=["cache"])[1]["cache"]

  def decode(params, cache, token):
    def step(carry, _):
      cache, token, pos = carry
      logits, state = model.apply({"params": params, "cache": cache},
                                  token[:, None], pos[:, None], mutable=["cache"])
      return (state["cache"], jnp.argmax(logits[:, 0], -1).astype(jnp.int32),
              pos + 1), None
    pos = jnp.full((batch,), prompt, jnp.int32)
    (cache, token, _), _ = jax.lax.scan(step, (cache, token, pos), None,
                                        length=steps)
    return token
  return jax.jit(prefill), jax.jit(decode)


def bench_decode(rounds: int, small: bool):
  models = _decode_models(small)
  steps, prompt = 16, 32
  rows = []
  for batch in ((1, 8) if small else (1, 8, 64)):
    fns, memory = {}, {}
    for name, (cfg, params) in models.items():
      params = jax.device_put(params)
      prefill, decode = _decoder_fn(cfg, batch, steps, prompt)
      tokens = jnp.ones((batch, prompt), jnp.int32)
      cache = jax.block_until_ready(prefill(params, tokens))
      token = jnp.ones((batch,), jnp.int32)
      fns[name] = functools.partial(decode, params, cache, token)
      stats = decode.lower(params, cache, token).compile().memory_analysis()
      memory[name] = (stats.argument_size_in_bytes + stats.temp_size_in_bytes
                      if stats is not None else float("nan"))
    t = time_interleaved(fns, rounds)
    base = batch * steps / t["bf16"]
    for name in models:
      rate = batch * steps / t[name]
      rows.append((f"decode batch {batch}", name, rate, rate / base))
      rows.append((f"decode batch {batch}", f"{name}: memory MiB",
                   memory[name] / 2 ** 20, memory[name] / memory["bf16"]))
  fns = {}
  batch, length = (2, 64) if small else (8, 256)
  tokens = jnp.ones((batch, length), jnp.int32)
  for name, (cfg, params) in models.items():
    forward = jax.jit(Transformer(cfg).apply)
    fns[name] = functools.partial(forward, {"params": jax.device_put(params)}, tokens)
  t = time_interleaved(fns, rounds)
  for name in models:
    rate = batch * length / t[name]
    rows.append((f"prefill [{batch}, {length}]", name, rate,
                 rate / (batch * length / t["bf16"])))
  return rows, "x bf16", "tokens/s (MiB)"


SECTIONS: dict[str, Callable] = {
    "hadamard": bench_hadamard,
    "quant": bench_quant,
    "train": bench_train,
    "data": bench_data,
    "decode": bench_decode,
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
  cli.run(main)
