"""Train state, next-token loss, and the train / eval step functions.

The steps are pure functions of (state, batch); run_setup.py jits them with
explicit in/out shardings and donates the state. A batch is a `data.Batch`
(int32 [B, L + 1] tokens, optionally segment ids and positions from first-fit
packing; position t predicts token t + 1; its `weights` count a target only
when it belongs to the same document as its input and is not padding).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bitnet_jax import chips
from bitnet_jax.training import optimizer as optimizer_lib
from bitnet_jax.data.batch import Batch
from bitnet_jax.loss import token_nll
from bitnet_jax.model import ModelConfig, Transformer, count_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array     # int32 scalar: optimizer updates done so far
  params: Any         # float32 latent weights
  opt_state: Any      # optax state (moments, schedule counters, hyperparams)


def init_state(model: Transformer, tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
  """Boxed state: params (and the moments built from them) keep their
  logical-axis metadata, which `sharding.state_shardings` reads."""
  tokens = jnp.zeros((1, min(model.cfg.seq_len, 8)), jnp.int32)
  params = model.init(rng, tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params))


def abstract_state(model: Transformer, tx: optax.GradientTransformation):
  """Shapes, dtypes and logical boxes of the state; nothing allocated."""
  return jax.eval_shape(functools.partial(init_state, model, tx),
                        jax.random.PRNGKey(0))


def unboxed_init(model, tx) -> Callable[[jax.Array], TrainState]:
  return lambda rng: nn.meta.unbox(init_state(model, tx, rng))


def loss_fn(params, batch: Batch, model: Transformer, normalizer=None):
  """Mean next-token NLL (total / normalizer; default: this batch's count)."""
  logits = model.apply({"params": params}, batch.inputs,
                       batch.input_positions, batch.input_segments)
  nll = token_nll(logits, batch.targets)
  weights = batch.weights
  total = jnp.sum(nll * weights)
  count = jnp.sum(weights)
  if normalizer is None:
    normalizer = jnp.maximum(count, 1.0)
  return total / normalizer, (total, count)


def microbatch_split(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B / k, ...]; microbatch j holds rows j, j + k, ... so each
  device keeps its share of every microbatch (no resharding)."""
  return batch.map(
      lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1))


def make_train_step(model: Transformer, tx: optax.GradientTransformation,
                    microbatches: int = 1):
  """One optimizer update; the gradient is accumulated over `microbatches`."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def gradients(params, batch):
    if microbatches == 1:
      (loss, (_, count)), grads = grad_fn(params, batch, model)
      return loss, count, grads
    count = jnp.maximum(jnp.sum(batch.weights), 1.0)

    def accumulate(acc, micro):
      (_, (total, _)), g = grad_fn(params, micro, model, count)
      return (jax.tree.map(jnp.add, acc[0], g), acc[1] + total), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, total), _ = jax.lax.scan(accumulate, (zeros, 0.0),
                                     microbatch_split(batch, microbatches))
    return total / count, count, grads

  def train_step(state: TrainState, batch: Batch):
    loss, count, grads = gradients(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    hyper = optimizer_lib.current_hyperparams(opt_state)
    grad_norm = optax.global_norm(grads)
    # 1.0 iff the loss, the gradient norm and every updated parameter are
    # finite: the loop reads it before a save (never a NaN checkpoint).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    for leaf in jax.tree.leaves(params):
      finite &= jnp.all(jnp.isfinite(leaf))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": hyper["lr"],
               "wd": hyper["wd"], "tokens": count,
               "finite": finite.astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), metrics
  return train_step


def make_eval_step(model: Transformer):
  def eval_step(params, batch: Batch):
    _, (total, count) = loss_fn(params, batch, model)
    return total, count
  return eval_step


def flops_per_token(cfg: ModelConfig, params) -> float:
  """Model FLOPs per trained token: 6 N (matmuls, forward + backward) plus
  attention 12 L d T (PaLM appendix B); the Hadamard and quantizers are O(d)
  per token and not counted."""
  matmul_params = count_params(params, non_embedding=True)
  matmul_params += cfg.d_model * cfg.vocab_size  # the output head
  return 6.0 * matmul_params + 12.0 * cfg.num_layers * cfg.d_model * cfg.seq_len


def device_peak_flops(device: jax.Device, override: float = 0.0) -> float | None:
  """Dense bf16 peak FLOP/s of one device (chips.py), or the override."""
  if override > 0:
    return override
  chip = chips.for_device_kind(device.device_kind)
  return chip.bf16_flops if chip else None
