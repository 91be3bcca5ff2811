"""A trained run, loaded for evaluation, analysis and generation.

`load(workdir)` is the one way to read a run (rundir.py's layout): its
`config.json`, its tokenizer and the params of its latest (or a given)
checkpoint step; the optimizer state is not read. The
model runs with the activation bits that step trained with (a run that
switched a8 -> a4 at quant.a4_start_step is a 4-bit model after it).
Model settings that do not change parameter shapes can be overridden at load
time, e.g. `q_bits=4, kv_bits=3` to evaluate with low-bit attention states
(Tables 2-3) or `act_bits=4`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from bitnet_jax import checkpoint as ckpt_lib
from bitnet_jax import rundir, run_config
from bitnet_jax.data import tokenizer as tokenizer_lib
from bitnet_jax.errors import ConfigError, MissingInput, reason
from bitnet_jax.model import ModelConfig, Transformer, param_shapes
from bitnet_jax.run_config import RunConfig
from bitnet_jax.loss import token_nll

OVERRIDABLE = ("act_bits", "q_bits", "kv_bits", "hadamard_block_size",
               "attention_impl", "dtype")


@dataclasses.dataclass
class Pretrained:
  run: RunConfig                 # the run's config (config.json, migrated)
  model_cfg: ModelConfig         # the model as this step computes it
  params: Any
  tokenizer: tokenizer_lib.Tokenizer
  step: int
  workdir: str

  @functools.cached_property
  def model(self) -> Transformer:
    return Transformer(self.model_cfg)

  def with_model(self, **overrides) -> "Pretrained":
    """The same weights under other shape-preserving model settings."""
    bad = set(overrides) - set(OVERRIDABLE)
    if bad:
      raise ConfigError(f"cannot override {sorted(bad)} of a trained model; "
                       f"allowed: {OVERRIDABLE}")
    return dataclasses.replace(self, model_cfg=self.model_cfg.replace(**overrides))

  @functools.cached_property
  def scorer(self):
    """jit: (params, rows [B, W + 1]) -> (logprob [B, W], greedy [B, W]) of
    each next token; K/V of BOS tokens keep 8 bits when kv_bits is set."""
    model, bos_id = self.model, self.tokenizer.bos_id

    def score(params, rows):
      inputs, targets = rows[:, :-1], rows[:, 1:]
      logits = model.apply({"params": params}, inputs, bos_BL=inputs == bos_id)
      greedy = jnp.argmax(logits, axis=-1) == targets
      return -token_nll(logits, targets), greedy
    return jax.jit(score)


def load(workdir: str, *, step: int | None = None,
         config: RunConfig | ml_collections.ConfigDict | None = None,
         **overrides) -> Pretrained:
  """Load a run's params (no optimizer state) and tokenizer."""
  directory_of_run = rundir.RunDir(workdir)
  run = run_config.parse(config or directory_of_run.read_config())
  model_cfg = run.model.replace(remat="none")
  directory, latest = ckpt_lib.resolve_checkpoint(workdir)
  step = latest if step is None else step
  if not (directory / str(step) / "state").exists():
    raise MissingInput(f"{workdir}: no checkpoint at step {step} (latest "
                            f"is {latest})")
  abstract = param_shapes(model_cfg)
  state_dir = directory / str(step) / "state"

  def unreadable(e: Exception) -> ckpt_lib.CheckpointError:
    # TensorStore's messages run to dozens of lines: --verbose prints them
    return ckpt_lib.CheckpointError(
        f"{state_dir}: the saved parameters cannot be read ({reason(e)}); "
        "the step may be truncated: pass --step=<an earlier step> "
        "(--verbose: the reader's whole error)")

  reader = ckpt_lib.Checkpointer("", read_only=True, directory=str(directory))
  try:
    saved = reader.saved_params(step)  # metadata: may hit a damaged file too
  except Exception as e:
    raise unreadable(e) from e
  finally:
    reader.close()
  ckpt_lib.check_param_shapes(saved, abstract,
                              f"{directory / str(step)} vs its config")
  model_cfg = model_cfg.replace(act_bits=run.trained_bits(step))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  item = {"params": abstract}
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item=item, partial_restore=True,
            restore_args=jax.tree.map(
                lambda _: ocp.ArrayRestoreArgs(sharding=device), item)))
  except Exception as e:
    raise unreadable(e) from e
  tokenizer = tokenizer_lib.load(directory_of_run.tokenizer_path(run.data))
  pre = Pretrained(run, model_cfg, restored["params"], tokenizer, step,
                   workdir)
  return pre.with_model(**overrides) if overrides else pre
