"""Two-stage schedules against a hand-computed table; decay mask; state."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bitnet_jax import defaults
from bitnet_jax.run_config import OptConfig, RunConfig
from bitnet_jax.training import optimizer


def opt_cfg(**kw):
  o = defaults.base_config().opt
  o.update(dict(lr=1e-3, lr_stage2=6e-4, lr_stage1_end=8e-4, lr_end=0.0,
                warmup_steps=10, stage2_start=0.5, weight_decay=0.1,
                weight_decay_stage2=0.0))
  o.update(kw)
  return OptConfig(**o)


# Written out by hand for T = 100 steps, warm-up 10, stage 2 from step 50.
LINEAR = {
    0: 0.0, 5: 5e-4, 9: 9e-4,
    10: 1e-3,                      # warm-up end: the stage-1 peak
    30: 9e-4,                      # halfway down stage 1 (1e-3 -> 8e-4 over 40)
    49: 1e-3 - 2e-4 * 39 / 40,     # just before the midpoint
    50: 6e-4,                      # the step down to the stage-2 peak
    51: 6e-4 * (1 - 1 / 49),       # stage 2 decays to 0 at step 99
    74: 6e-4 * (1 - 24 / 49),
    99: 0.0,                       # the last step
}


def test_linear_lr_schedule_table():
  sched = optimizer.lr_schedule(opt_cfg(), 100)
  for step, expected in LINEAR.items():
    assert float(sched(step)) == pytest.approx(expected, abs=1e-9), step


def test_cosine_lr_schedule_table():
  sched = optimizer.lr_schedule(opt_cfg(lr_shape="cosine"), 100)
  expected = {
      10: 1e-3,
      20: 8e-4 + 2e-4 * 0.5 * (1 + math.cos(math.pi * 10 / 40)),
      30: 9e-4,
      50: 6e-4,
      60: 6e-4 * 0.5 * (1 + math.cos(math.pi * 10 / 49)),
      99: 0.0,
  }
  for step, value in expected.items():
    assert float(sched(step)) == pytest.approx(value, abs=1e-9), step


def test_default_stage1_end_is_halfway_so_the_midpoint_steps_down():
  sched = optimizer.lr_schedule(opt_cfg(lr_stage1_end=-1.0), 100)
  assert float(sched(49)) == pytest.approx(1e-3 - (1e-3 - 8e-4) * 39 / 40)
  assert float(sched(49)) > float(sched(50)) == pytest.approx(6e-4)


def test_weight_decay_schedule():
  sched = optimizer.wd_schedule(opt_cfg(), 100)
  for step in (0, 10, 49):
    assert float(sched(step)) == pytest.approx(0.1)
  for step in (50, 51, 99):
    assert float(sched(step)) == 0.0


def test_hyperparams_live_in_the_state_and_decay_hits_kernels_only():
  params = {"layers": {"attn": {"o": {"kernel": jnp.ones((3, 3)),
                                      "norm": {"scale": jnp.ones(3)}}}},
            "head": {"kernel": jnp.ones((3, 5))},
            "other": {"kernel": jnp.ones(2)},  # not a registered site
            "embed": {"embedding": jnp.ones((5, 3))}}
  tx = optimizer.make_optimizer(opt_cfg(grad_clip=0.0), 100)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  p = params
  update = jax.jit(tx.update)
  for step in range(51):
    updates, state = update(zeros, state, p)
    p = optax.apply_updates(p, updates)
    hyper = optimizer.current_hyperparams(state)
    # After update `step`, the state holds the values that update used.
    assert float(hyper["lr"]) == pytest.approx(float(
        optimizer.lr_schedule(opt_cfg(), 100)(step)), abs=1e-9)
    assert float(hyper["wd"]) == pytest.approx(0.1 if step < 50 else 0.0)
  # Zero gradients: only decoupled weight decay moved anything, and only kernels.
  expected = np.prod([1 - 0.1 * LINEAR.get(s, float(
      optimizer.lr_schedule(opt_cfg(), 100)(s))) for s in range(50)])
  o = p["layers"]["attn"]["o"]
  np.testing.assert_allclose(o["kernel"], expected, rtol=1e-5)
  np.testing.assert_allclose(p["head"]["kernel"], expected, rtol=1e-5)
  np.testing.assert_array_equal(o["norm"]["scale"], 1.0)
  np.testing.assert_array_equal(p["other"]["kernel"], 1.0)
  np.testing.assert_array_equal(p["embed"]["embedding"], 1.0)


def test_bad_schedule_config():
  c = defaults.tiny_config()  # 600 steps: stage 2 from step 300
  c.opt.warmup_steps = 400
  with pytest.raises(ValueError, match="warmup_steps 400 must be <= the "
                     "stage-2 start"):
    RunConfig.from_config(c)
  with pytest.raises(ValueError, match="lr_shape"):
    opt_cfg(lr_shape="step")
