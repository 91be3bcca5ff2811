"""The post-training rotation baselines (QuaRot, SpinQuant) on a BitNet b1.58
run (the command is bitnet_jax/ptq.py).

See the command's docstring for usage.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import policy, rundir, sites
from bitnet_jax import rotations as rotation_lib
from bitnet_jax.errors import ConfigError
from bitnet_jax.progress import Progress, format_seconds
from bitnet_jax.model import ModelConfig, Transformer, param_shapes
from bitnet_jax.loss import token_nll

METHODS = {"quarot": "random_hadamard", "spinquant": "learned"}


def linear_slots(cfg: ModelConfig) -> list[tuple[tuple[str, ...], sites.Site]]:
  """(path of the projection's params, site) for every rotated projection;
  with scan_layers the arrays under a path carry a leading layer axis."""
  prefixes = [("layers",)] if cfg.scan_layers else [
      (f"layer_{i}",) for i in range(cfg.num_layers)]
  return [(p + (site.block, site.name), site) for p in prefixes
          for site in sites.SITES]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  """A copy of the nested dict `tree` with tree[path] = value."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _set(tree[path[0]], path[1:], value)
  return out


def _over_layers(fn, cfg: ModelConfig):
  return jax.vmap(fn) if cfg.scan_layers else fn


def ptq_config(cfg: ModelConfig, method: str, fuse: bool,
               act_bits: int = 4) -> ModelConfig:
  if method not in METHODS:
    raise ConfigError(f"method must be one of {tuple(METHODS)}, got {method!r}")
  if cfg.variant != "b1.58":
    raise ConfigError(f"the rotation baselines quantize a BitNet b1.58 run; this "
                     f"run's variant is {cfg.variant!r}")
  return cfg.replace(ptq_rotation=METHODS[method], ptq_fused=fuse,
                     act_bits=act_bits, weights="latent")


def quarot_signs(cfg: ModelConfig, seed: int = 0) -> dict:
  """Random +-1 diagonals, one per projection and layer: {path: signs}."""
  key = jax.random.PRNGKey(seed)
  out = {}
  for i, (path, site) in enumerate(linear_slots(cfg)):
    n = cfg.d_ff if site is sites.DOWN else cfg.d_model
    k = jax.random.fold_in(key, i)
    if cfg.scan_layers:
      out[path] = jax.vmap(lambda kk: rotation_lib.random_signs(kk, n))(
          jax.random.split(k, cfg.num_layers))
    else:
      out[path] = rotation_lib.random_signs(k, n)
  return out


def dense_rotations(cfg: ModelConfig, signs: dict) -> dict:
  """The dense R = diag(s) H of each QuaRot rotation (SpinQuant's start)."""
  dense = _over_layers(lambda s: rotation_lib.hadamard_matrix(
      s, cfg.hadamard_block_size), cfg)
  return {path: dense(s) for path, s in signs.items()}


def rotate_params(params, cfg: ModelConfig, rotations: dict):
  """The b1.58 params as params of the PTQ model `cfg`: each projection gains
  its rotation (signs or dense R) and, where fused, the kernel R^T W."""
  kind = cfg.ptq_rotation
  name = "signs" if kind == "random_hadamard" else "rotation"
  fuse = _over_layers(lambda w, r: rotation_lib.fuse_kernel(
      w, kind, r, cfg.hadamard_block_size), cfg)
  out = params
  for path, site in linear_slots(cfg):
    linear = dict(_get(params, path))
    rot = rotations[path]
    linear[name] = rot
    if policy.linear(cfg, site.name).fused:
      linear[sites.KERNEL] = fuse(linear[sites.KERNEL], rot)
    out = _set(out, path, linear)
  return out


# ---------------------------------------------------------------------------
# SpinQuant: Cayley SGD on the orthogonal group.


def cayley_step(r: jax.Array, g: jax.Array, lr: float) -> jax.Array:
  """One Cayley retraction: A = G R^T - R G^T (skew), R <- (I + lr/2 A)^-1
  (I - lr/2 A) R. Orthogonal in, orthogonal out; the first-order change
  -A R = -G + R G^T R is a descent direction. A Newton-Schulz correction
  R (3 I - R^T R) / 2 then squares the float32 rounding error away, so it
  does not pile up over many steps."""
  t = lambda m: jnp.swapaxes(m, -1, -2)
  a = g @ t(r) - r @ t(g)
  eye = jnp.eye(r.shape[-1], dtype=r.dtype)
  half = 0.5 * lr * a
  r = jnp.linalg.solve(eye + half, (eye - half) @ r)
  return r @ (1.5 * eye - 0.5 * (t(r) @ r))


def orthogonality_error(r: jax.Array) -> float:
  """max over matrices of the Frobenius norm ||R^T R - I||."""
  rtr = jnp.swapaxes(r, -1, -2) @ r
  err = rtr - jnp.eye(r.shape[-1], dtype=r.dtype)
  return float(jnp.max(jnp.sqrt(jnp.sum(err * err, axis=(-2, -1)))))


def make_loss(cfg: ModelConfig):
  """(rotations, params, rows [B, W + 1]) -> mean next-token NLL of the
  quantized PTQ model built from the b1.58 params. The params are an
  argument, never a closure: jit would embed them as constants and XLA would
  spend minutes constant-folding their quantization."""
  model = Transformer(cfg)

  def loss(rotations, params, rows):
    p = rotate_params(params, cfg, rotations)
    logits = model.apply({"params": p}, rows[:, :-1])
    return jnp.mean(token_nll(logits, rows[:, 1:]))
  return loss


def mean_loss(loss_fn, rotations, rows: np.ndarray, batch: int) -> float:
  """Mean of loss_fn over all rows in batches (the last one padded by reuse)."""
  total, count = 0.0, 0
  progress = Progress(len(rows), "rows", "calibration loss")
  for start in range(0, len(rows), batch):
    chunk = rows[start:start + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, rows[:batch - n]])
    value = float(loss_fn(rotations, jnp.asarray(chunk)))
    total += value * n
    count += n
    progress.advance(n)
  return total / count


def learn_rotations(cfg: ModelConfig, params, rotations: dict,
                    rows: np.ndarray, steps: int, lr: float, batch: int,
                    seed: int = 0, log_every: int = 10) -> tuple[dict, dict]:
  """SpinQuant: Cayley SGD on every dense rotation for `steps` batches of the
  calibration rows. Returns (rotations, record of losses)."""
  if cfg.ptq_rotation != "learned":
    raise ValueError("learn_rotations needs a ptq_rotation='learned' config")
  if len(rows) < batch:
    batch = len(rows)
  loss = make_loss(cfg)
  loss_jit = jax.jit(loss)
  loss_on_rows = lambda rots, chunk: loss_jit(rots, params, chunk)

  # One jit for the gradient and one per rotation shape for the retraction:
  # compiled together, the batched solves took XLA:CPU minutes to compile
  # at d_ff = 384 (seconds apart).
  grad_fn = jax.jit(jax.value_and_grad(loss))
  retract = jax.jit(cayley_step, static_argnums=2)

  def step(rots, params, chunk):
    value, grads = grad_fn(rots, params, chunk)
    return {k: retract(rots[k], grads[k], lr) for k in rots}, value

  rng = np.random.default_rng(seed)
  start = mean_loss(loss_on_rows, rotations, rows, batch)
  logging.info("spinquant: calibration loss %.4f at the QuaRot start "
               "(%d rows)", start, len(rows))
  history, order, t0 = [], np.array([], np.int64), time.time()
  for i in range(steps):
    if len(order) < batch:
      order = np.concatenate([order, rng.permutation(len(rows))])
    take, order = order[:batch], order[batch:]
    rotations, value = step(rotations, params, jnp.asarray(rows[take]))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      value = float(value)
      history.append((i + 1, value))
      per_step = (time.time() - t0) / (i + 1)
      logging.info("spinquant step %d/%d: batch loss %.4f (%.2f s/step, "
                   "ETA %s)", i + 1, steps, value, per_step,
                   format_seconds(per_step * (steps - i - 1)))
  end = mean_loss(loss_on_rows, rotations, rows, batch)
  err = max(orthogonality_error(r) for r in rotations.values())
  logging.info("spinquant: calibration loss %.4f -> %.4f; max ||R^T R - I|| "
               "= %.2e", start, end, err)
  return rotations, {"calib_loss_start": start, "calib_loss_end": end,
                     "orthogonality_error": err, "history": history}


# ---------------------------------------------------------------------------
# Calibration data and the output run.


def calibration_rows(tokenizer, docs, samples: int, seq_len: int) -> np.ndarray:
  """Up to `samples` rows of seq_len + 1 tokens cut from the document stream
  ([BOS] doc [EOS] ...), without overlap."""
  from bitnet_jax.evaluation.perplexity import token_rows
  return token_rows(tokenizer, docs, samples, seq_len + 1)


def quantize(pre, method: str, fuse: bool, *, act_bits: int = 4,
             seed: int = 0, calib_rows: np.ndarray | None = None,
             steps: int = 100, lr: float = 1.5, batch: int = 8
             ) -> tuple[ModelConfig, Any, dict]:
  """(PTQ model config, its params, info) from a loaded b1.58 run."""
  cfg = ptq_config(pre.model_cfg, method, fuse, act_bits)
  rotations = quarot_signs(cfg, seed)
  info: dict[str, Any] = {"method": method, "fused": fuse, "act_bits": act_bits,
                          "seed": seed, "source": pre.workdir,
                          "source_step": pre.step}
  if method == "spinquant":
    if calib_rows is None:
      raise ValueError("spinquant needs calibration rows")
    rotations = dense_rotations(cfg, rotations)
    rotations, record = learn_rotations(cfg, pre.params, rotations, calib_rows,
                                        steps, lr, batch, seed)
    info.update(record, calib_rows=int(len(calib_rows)), steps=steps, lr=lr,
                batch=batch)
  params = rotate_params(pre.params, cfg, rotations)
  from bitnet_jax.checkpoint import check_param_shapes
  check_param_shapes(params, param_shapes(cfg), "ptq output")
  return cfg, params, info


def write_run(pre, out: str, cfg: ModelConfig, params, info: dict) -> None:
  """Write the PTQ model as a run directory the evaluation tools read."""
  from bitnet_jax import checkpoint as ckpt_lib
  config = pre.run.to_config()
  config.quant.act_bits = cfg.act_bits
  config.quant.a4_start_step = -1
  config.quant.ptq_rotation = cfg.ptq_rotation
  config.quant.ptq_fused = cfg.ptq_fused
  config.init_from = ""
  config.data.tokenizer = ""  # the copy in `out`
  run = rundir.RunDir(out)
  run.prepare()
  run.write_config(config)
  pre.tokenizer.save(run.path / pre.tokenizer.filename)
  writer = ckpt_lib.Checkpointer(out, keep=1, async_save=False)
  writer.save(pre.step, {"step": jnp.asarray(pre.step, jnp.int32),
                         "params": params}, None, force=True)
  writer.wait()
  writer.close()
  (run / rundir.PTQ).write_text(json.dumps(info, indent=2))
