"""What a run compiles and shards, built from the config alone (no data, no
checkpoint): the mesh and logical rules, the optimizer, the abstract sharded
state, and the jitted train / eval steps for each activation width the run
uses (8 and, with quant.a4_start_step, 4). The dry run compiles the same."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitnet_jax import defaults
from bitnet_jax.model import ModelConfig, Transformer, count_params
from bitnet_jax.training import sharding
from bitnet_jax.training import optimizer as optimizer_lib
from bitnet_jax.training import train_step as step_lib


@dataclasses.dataclass
class Setup:
  """What a run compiles and shards, built from the config alone."""
  config: Any
  model_cfg: ModelConfig
  mesh: Any
  rules: Any
  tx: Any
  abstract: Any            # unboxed ShapeDtypeStructs carrying shardings
  state_sharding: Any
  steps: dict              # act_bits -> jitted train step
  eval_steps: dict         # act_bits -> jitted eval step
  num_steps: int
  stop_step: int
  params_total: int
  flops_per_token: float
  uncentred: Any = None    # mean_centre: the state without offsets (init_from)

  def context(self) -> contextlib.ExitStack:
    """Mesh + logical rules: activation sharding constraints resolve in here."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def bits_at(self, step: int) -> int:
    a4 = self.config.quant.a4_start_step
    return 4 if (a4 >= 0 and step >= a4) else self.model_cfg.act_bits


def build(config, devices=None) -> Setup:
  model_cfg = ModelConfig.from_config(config)
  defaults.validate(config)
  num_steps = config.train.num_steps
  stop = defaults.stop_step(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  model_cfg = model_cfg.for_platform(mesh.devices.flat[0].platform)
  sharding.check_batch_divides(config.data.batch_size, mesh,
                               config.train.microbatches)
  rules = sharding.logical_rules(config.mesh)
  tx = optimizer_lib.make_optimizer(config.opt, num_steps)
  abstract, state_sharding = sharded_abstract(model_cfg, tx, mesh, rules)
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  bits = {model_cfg.act_bits}
  if config.quant.a4_start_step >= 0:
    bits.add(4)
  steps, eval_steps = {}, {}
  for b in bits:
    model = Transformer(model_cfg.replace(act_bits=b))
    steps[b] = jax.jit(step_lib.make_train_step(model, tx,
                                                config.train.microbatches),
                       in_shardings=(state_sharding, batch_sh),
                       out_shardings=(state_sharding, repl), donate_argnums=0)
    eval_steps[b] = jax.jit(step_lib.make_eval_step(model),
                            in_shardings=(state_sharding.params, batch_sh),
                            out_shardings=(repl, repl))
  params = abstract.params
  uncentred = (sharded_abstract(model_cfg.replace(mean_centre=False), tx, mesh,
                                rules)[0] if model_cfg.mean_centre else None)
  return Setup(config, model_cfg, mesh, rules, tx, abstract, state_sharding, steps,
               eval_steps, num_steps, stop, count_params(params),
               step_lib.flops_per_token(model_cfg, params), uncentred)


def sharded_abstract(model_cfg: ModelConfig, tx, mesh, rules):
  """(ShapeDtypeStructs carrying shardings, the shardings) of the state."""
  boxed = step_lib.abstract_state(Transformer(model_cfg), tx)
  state_sharding = sharding.state_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      nn.meta.unbox(boxed), state_sharding)
  return abstract, state_sharding


def abstract_batch(config, mesh):
  shape = (config.data.batch_size, config.model.seq_len + 1)
  spec = jax.ShapeDtypeStruct(shape, jnp.int32,
                              sharding=sharding.batch_sharding(mesh))
  keys = ["tokens"] + (["segment_ids", "positions"]
                       if config.data.packing == "first_fit" else [])
  return {k: spec for k in keys}


