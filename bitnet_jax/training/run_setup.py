"""What a run compiles and shards, built from the run config alone (no data,
no checkpoint): the mesh and logical rules, the optimizer, the abstract
sharded state, and the jitted train / eval steps for each activation width
the run uses (8 and, with quant.a4_start_step, 4). The dry run compiles the
same."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh
import optax

from bitnet_jax import run_config
from bitnet_jax.data.batch import Batch
from bitnet_jax.model import ModelConfig, Transformer, count_params
from bitnet_jax.run_config import RunConfig
from bitnet_jax.training import sharding
from bitnet_jax.training import optimizer as optimizer_lib
from bitnet_jax.training import train_step as step_lib
from bitnet_jax.training.train_step import TrainState


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
  """What a run compiles and shards, built from the run config alone."""
  run: RunConfig
  model_cfg: ModelConfig               # run.model resolved for the platform
  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]
  tx: optax.GradientTransformation
  abstract: TrainState                 # ShapeDtypeStructs carrying shardings
  state_sharding: TrainState           # NamedShardings, the same tree
  steps: dict[int, Callable]           # act_bits -> jitted train step
  eval_steps: dict[int, Callable]      # act_bits -> jitted eval step
  params_total: int
  flops_per_token: float
  uncentred: TrainState | None = None  # mean_centre: the state without
                                       # offsets (init_from of an uncentred run)

  @property
  def num_steps(self) -> int:
    return self.run.train.num_steps

  @property
  def stop_step(self) -> int:
    return self.run.stop_step

  def context(self) -> contextlib.ExitStack:
    """Mesh + logical rules: activation sharding constraints resolve in here."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def bits_at(self, step: int) -> int:
    return self.run.bits_at(step)


def build(config, devices=None) -> Setup:
  """config: a RunConfig (or a ConfigDict, parsed here)."""
  run = run_config.parse(config)
  mesh = sharding.make_mesh(run.mesh, devices)
  model_cfg = run.model.for_platform(mesh.devices.flat[0].platform)
  sharding.check_batch_divides(run.data.batch_size, mesh,
                               run.train.microbatches)
  rules = sharding.logical_rules(run.mesh)
  tx = optimizer_lib.make_optimizer(run.opt, run.train.num_steps)
  abstract, state_sharding = sharded_abstract(model_cfg, tx, mesh, rules)
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  steps, eval_steps = {}, {}
  for b in run.bits_used():
    model = Transformer(model_cfg.replace(act_bits=b))
    steps[b] = jax.jit(step_lib.make_train_step(model, tx,
                                                run.train.microbatches),
                       in_shardings=(state_sharding, batch_sh),
                       out_shardings=(state_sharding, repl), donate_argnums=0)
    eval_steps[b] = jax.jit(step_lib.make_eval_step(model),
                            in_shardings=(state_sharding.params, batch_sh),
                            out_shardings=(repl, repl))
  params = abstract.params
  uncentred = (sharded_abstract(model_cfg.replace(mean_centre=False), tx, mesh,
                                rules)[0] if model_cfg.mean_centre else None)
  return Setup(run=run, model_cfg=model_cfg, mesh=mesh, rules=rules, tx=tx,
               abstract=abstract, state_sharding=state_sharding, steps=steps,
               eval_steps=eval_steps, params_total=count_params(params),
               flops_per_token=step_lib.flops_per_token(model_cfg, params),
               uncentred=uncentred)


def sharded_abstract(model_cfg: ModelConfig, tx, mesh, rules):
  """(ShapeDtypeStructs carrying shardings, the shardings) of the state."""
  boxed = step_lib.abstract_state(Transformer(model_cfg), tx)
  state_sharding = sharding.state_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      nn.meta.unbox(boxed), state_sharding)
  return abstract, state_sharding


def abstract_batch(run: RunConfig, mesh: Mesh) -> Batch:
  """The global batch's ShapeDtypeStructs, sharded over the batch axes."""
  return Batch.abstract(run.data.batch_size, run.model.seq_len,
                        run.data.packing == "first_fit",
                        sharding.batch_sharding(mesh))
