"""Batched generation with a KV cache: one prefill, then one jitted decode loop.

  python -m bitnet_jax.generate --model=DIR --prompt="Once upon a time"
  python -m bitnet_jax.generate --model=DIR --batch-file=prompts.txt \
      --max_new_tokens=128 --temperature=0.8 --top_p=0.95 --stop=$'\n\n' --kv_bits=4

DIR is an exported model (`python -m bitnet_jax.export`: packed ternary
weights, integer matmuls) or a training run directory (latent weights,
fake-quantized forward). --kv_bits=8/4/3 stores the KV cache as codes (4 and 3
bits: two per byte) plus one absmax per token and head, the BOS token's K/V at
8 bits; the cache's memory is printed. Python API: `load(DIR)`, then
`generate(model, prompts, ...)`.

Prompts are left-padded to a common width (padding is masked out of
attention, and each row's RoPE positions start at its own first token), so
every row decodes at the same cache index. Sampling: greedy (temperature 0),
or temperature with nucleus (top-p) filtering. Stop sequences and EOS cut the
returned text.
"""
from __future__ import annotations

import sys
import time

from absl import flags
from etils import epath

from bitnet_jax import cli
from bitnet_jax.errors import ConfigError, MissingInput
from bitnet_jax.inference.generation import (cache_bytes, generate, load,
                                             padded_width)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program)."""
  flags.DEFINE_string("model", None, "Exported model directory or training run.")
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
  flags.DEFINE_string("batch-file", "", "A file with one prompt per line.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with temperature).")
  flags.DEFINE_multi_string("stop", [], "Stop sequences (repeatable).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("kv_bits", 0, "KV cache bits 8/4/3 (0: as trained).")


def main(argv):
  del argv
  cli.require("model")
  prompts = list(FLAGS.prompt)
  batch_file = FLAGS["batch-file"].value
  if batch_file:
    try:
      text = epath.Path(batch_file).read_text()
      prompts += [line for line in text.splitlines() if line.strip()]
    except OSError as e:
      raise MissingInput(f"--batch-file: {e}") from None
  if not prompts:
    raise ConfigError("give --prompt or --batch-file")
  model = load(FLAGS.model, **({"kv_bits": FLAGS.kv_bits} if FLAGS.kv_bits else {}))
  start = time.perf_counter()
  texts = generate(model, prompts, FLAGS.max_new_tokens, FLAGS.stop,
                   FLAGS.temperature, FLAGS.top_p, FLAGS.seed)
  seconds = time.perf_counter() - start
  for prompt, text in zip(prompts, texts):
    print(f"{prompt}{text}\n---")
  cfg = model.model_cfg
  length = padded_width(max(len(model.tokenizer.encode(p)) + 1 for p in prompts)) + \
      FLAGS.max_new_tokens
  kv = cache_bytes(cfg, len(prompts), length)
  bf16 = cache_bytes(cfg.replace(kv_bits=0, dtype="bfloat16"), len(prompts), length)
  print(f"{len(prompts)} prompts x {FLAGS.max_new_tokens} new tokens in "
        f"{seconds:.2f} s (including compilation); weights: {cfg.weights}; "
        f"KV cache ({cfg.kv_bits or 'float'} bits): {kv / 2**20:.2f} MiB "
        f"({kv / bf16:.0%} of bf16)", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
