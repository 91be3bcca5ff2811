"""The BitNet two-stage schedules and the optax chain (Sec. 2.2-3, Table 9).

Learning rate, as a function of the optimizer step s (0 = the first update):
  s <  W            linear warm-up 0 -> lr
  W <= s < M        stage 1: lr -> lr_stage1_end (linear or cosine)
  M <= s <= T - 1   stage 2: steps down to lr_stage2, decays to lr_end
with W = warmup_steps, M = round(stage2_start * T), T = num_steps. The stage-1
end defaults to halfway between the two peaks, so the midpoint is always a
step down (BitNet b1.58's recipe: e.g. 1.5e-3 -> 8e-4, then 5e-4 -> 0).
Weight decay: weight_decay for s < M, weight_decay_stage2 from M on.

Both are optax schedules; `optax.inject_hyperparams` keeps their current
values in the optimizer state, so a checkpoint carries them and a restored run
continues the schedule exactly. Decoupled weight decay (AdamW) applies to the
linear kernels only (not norms, not the embedding) unless decay_all_params.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from bitnet_jax import sites
from bitnet_jax.run_config import OptConfig


def _decay(init: float, end: float, steps: int, shape: str) -> optax.Schedule:
  steps = max(steps, 1)
  if shape == "linear":
    return optax.linear_schedule(init, end, steps)

  def cosine(count):
    frac = jnp.minimum(count, steps) / steps
    return end + (init - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
  return cosine


def lr_schedule(opt: OptConfig, num_steps: int) -> optax.Schedule:
  """(The ranges are RunConfig's: warm-up <= stage-2 start <= num_steps.)"""
  mid = opt.stage2_start_step(num_steps)
  stage1_end = opt.lr_stage1_end
  if stage1_end < 0:
    stage1_end = 0.5 * (opt.lr + opt.lr_stage2)
  warm = optax.linear_schedule(0.0, opt.lr, max(opt.warmup_steps, 1))
  stage1 = _decay(opt.lr, stage1_end, mid - opt.warmup_steps, opt.lr_shape)
  stage2 = _decay(opt.lr_stage2, opt.lr_end, num_steps - 1 - mid, opt.lr_shape)
  return optax.join_schedules([warm, stage1, stage2], [opt.warmup_steps, mid])


def wd_schedule(opt: OptConfig, num_steps: int) -> optax.Schedule:
  mid = opt.stage2_start_step(num_steps)
  return optax.join_schedules([optax.constant_schedule(opt.weight_decay),
                               optax.constant_schedule(opt.weight_decay_stage2)],
                              [mid])


def decay_mask(params):
  """True for the projections' and the head's kernels (sites.py): what
  weight decay applies to."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: sites.is_weight_matrix(sites.path_keys(path)), params)


def make_optimizer(opt: OptConfig, num_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with scheduled learning rate and decay."""
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=lr_schedule(opt, num_steps),
      weight_decay=wd_schedule(opt, num_steps),
      b1=opt.b1, b2=opt.b2, eps=opt.eps,
      mask=None if opt.decay_all_params else decay_mask)
  parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
  return optax.chain(*parts, adamw)


def current_hyperparams(opt_state) -> dict[str, jax.Array]:
  """The learning rate and weight decay the last update used (from the state)."""
  stack = [opt_state]
  while stack:  # chains nest states in tuples
    s = stack.pop(0)
    if hasattr(s, "hyperparams"):
      return {"lr": s.hyperparams["learning_rate"],
              "wd": s.hyperparams["weight_decay"]}
    if isinstance(s, (tuple, list)):
      stack.extend(s)
  raise ValueError("optimizer state has no injected hyperparameters")
