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

import functools
import logging
import os
import sys
import time
from typing import Sequence

from absl import flags

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import cli
from bitnet_jax.errors import ConfigError, InputError, MissingInput
from bitnet_jax.model import ModelConfig, Transformer


def sample(logits_BV: jax.Array, rng: jax.Array, temperature: float,
           top_p: float) -> jax.Array:
  """Next tokens [B]: argmax at temperature 0, else nucleus sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV.astype(jnp.float32) / temperature
  if top_p < 1.0:
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs = jnp.sort(probs, axis=-1)[:, ::-1]
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass above
    kept = jnp.where(before < top_p, sorted_probs, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)  # smallest kept prob
    logits = jnp.where(probs >= threshold, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _decoder(cfg: ModelConfig, width: int, max_new: int, temperature: float,
             top_p: float, bos_id: int):
  model = Transformer(cfg, decode_len=width + max_new)

  def run(params, prompt_BP, valid_BP, positions_BP, rng):
    logits, state = model.apply(
        {"params": params}, prompt_BP, positions_BP,
        bos_BL=(prompt_BP == bos_id) & valid_BP, valid_BL=valid_BP,
        mutable=["cache"])
    rng, first_rng = jax.random.split(rng)
    first = sample(logits[:, -1], first_rng, temperature, top_p)

    def step(carry, _):
      cache, token, pos, rng = carry
      rng, sub = jax.random.split(rng)
      logits, state = model.apply(
          {"params": params, "cache": cache}, token[:, None], pos[:, None],
          bos_BL=jnp.zeros_like(token[:, None], jnp.bool_), mutable=["cache"])
      return (state["cache"], sample(logits[:, 0], sub, temperature, top_p),
              pos + 1, rng), token

    carry = (state["cache"], first, positions_BP[:, -1] + 1, rng)
    (_, last, _, _), tokens = jax.lax.scan(step, carry, None, length=max_new - 1)
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)

  return jax.jit(run)


def _width(n: int) -> int:
  return max(16, -(-n // 16) * 16)


def generate_tokens(pre, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    temperature: float = 0.0, top_p: float = 1.0,
                    seed: int = 0) -> np.ndarray:
  """New tokens [len(prompts), max_new_tokens] for token-id prompts."""
  cfg = pre.model_cfg
  longest = max(len(p) for p in prompts)
  if longest > cfg.seq_len:
    raise InputError(f"a prompt has {longest} tokens; the model's context is "
                     f"{cfg.seq_len}")
  if not prompts or min(len(p) for p in prompts) == 0:
    raise InputError("every prompt needs at least one token")
  if longest + max_new_tokens > cfg.seq_len:
    logging.warning("generating %d tokens after a %d-token prompt goes past the "
                    "trained context (%d)", max_new_tokens, longest, cfg.seq_len)
  width = _width(longest)
  b = len(prompts)
  tokens = np.zeros((b, width), np.int32)
  valid = np.zeros((b, width), bool)
  positions = np.zeros((b, width), np.int32)
  for r, p in enumerate(prompts):
    n = len(p)
    tokens[r, width - n:] = p
    valid[r, width - n:] = True
    positions[r, width - n:] = np.arange(n)
  run = _decoder(cfg, width, max_new_tokens, float(temperature), float(top_p),
                 pre.tokenizer.bos_id)
  out = run(pre.params, tokens, valid, positions, jax.random.PRNGKey(seed))
  return np.asarray(out)


def cut(text: str, stop: Sequence[str]) -> str:
  """Text up to the first stop sequence."""
  ends = [text.find(s) for s in stop if s and s in text]
  return text[:min(ends)] if ends else text


def generate_text(pre, prompts: Sequence[str], max_new_tokens: int = 64,
                  stop: Sequence[str] = (), temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0) -> list[str]:
  """Continuations of text prompts (each prompt gets a BOS)."""
  tok = pre.tokenizer
  ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
  out = generate_tokens(pre, ids, max_new_tokens, temperature, top_p, seed)
  texts = []
  for row in out:
    row = list(row)
    if tok.eos_id in row:
      row = row[:row.index(tok.eos_id)]
    texts.append(cut(tok.decode(row), stop))
  return texts


def load(path: str, **overrides):
  """An exported model directory or a training run, ready for `generate`.
  overrides: shape-preserving model settings, e.g. kv_bits=4."""
  from bitnet_jax import export, pretrained, rundir
  from bitnet_jax import tokenizer as tokenizer_lib
  if not os.path.isdir(path):
    raise MissingInput(f"{path} is not a directory")
  if not os.path.exists(os.path.join(path, export.WEIGHTS_FILE)):
    return pretrained.load(path, **overrides)
  cfg, params = export.load_weights(path)
  run = rundir.RunDir(path)
  if not run.own_tokenizer.exists():
    raise MissingInput(f"{path} has no {rundir.TOKENIZER}")
  model = pretrained.Pretrained(run.read_config(), cfg, jax.device_put(params),
                                tokenizer_lib.Tokenizer.load(run.own_tokenizer),
                                -1, path)
  return model.with_model(**overrides) if overrides else model


def generate(model, prompts: Sequence[str], max_new_tokens: int = 64,
             stop: Sequence[str] = (), temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> list[str]:
  """Continuations of text prompts; see generate_text."""
  return generate_text(model, prompts, max_new_tokens, stop, temperature, top_p,
                       seed)


def cache_bytes(cfg: ModelConfig, batch: int, length: int) -> int:
  """Bytes of the KV cache for `batch` rows of `length` positions (abstract:
  nothing is allocated)."""
  model = Transformer(cfg, decode_len=length)
  tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes["cache"]))


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
      with open(batch_file) as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
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
  length = _width(max(len(model.tokenizer.encode(p)) + 1 for p in prompts)) + \
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
