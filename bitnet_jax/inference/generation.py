"""Batched generation with a KV cache: one prefill, then one jitted decode
loop (the command is bitnet_jax/generate.py).

See the command's docstring for usage.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.errors import InputError, MissingInput
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


def padded_width(n: int) -> int:
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
  width = padded_width(longest)
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
  from bitnet_jax import rundir
  from bitnet_jax.inference import exported as export
  from bitnet_jax.inference import pretrained
  from bitnet_jax.data import tokenizer as tokenizer_lib
  if not epath.Path(path).is_dir():
    raise MissingInput(f"{path} is not a directory")
  if not (epath.Path(path) / export.WEIGHTS_FILE).exists():
    return pretrained.load(path, **overrides)
  cfg, params = export.load_weights(path)
  run = rundir.RunDir(path)
  if not run.own_tokenizer.exists():
    raise MissingInput(f"{path} has no {rundir.TOKENIZER} or "
                       f"{rundir.TOKENIZER_JSON}")
  model = pretrained.Pretrained(run.read_config(), cfg, jax.device_put(params),
                                tokenizer_lib.load(run.own_tokenizer),
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
