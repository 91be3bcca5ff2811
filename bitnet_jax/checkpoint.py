"""Orbax checkpoints: one step = train state + data-iterator state.

`Checkpointer` wraps an `ocp.CheckpointManager` over `<workdir>/checkpoints`
(keep-N, asynchronous saves). Each step directory holds two items: `state`
(step, params, optimizer state; restored straight onto the target shardings)
and `data` (grain's JSON iterator state, one file per process).

Start-up resumes the latest readable step. A step that cannot be restored
(truncated or corrupted files) is logged with the reason, renamed to
`<step>.unreadable`, and the previous step is tried.

`restore_init_from` implements the a8 -> a4 continuation across runs: it
restores params, optimizer state and step from another run's workdir (or one
of its step directories), after checking every parameter's shape.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used (one clear line for the user)."""


def _param_shapes(tree) -> dict[str, tuple[int, ...]]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
            for k in path]
    out["/".join(keys)] = tuple(leaf.shape)
  return out


def check_param_shapes(saved_params, target_params, source: str) -> None:
  """Raise a ValueError naming the first parameter whose shape differs."""
  saved, target = _param_shapes(saved_params), _param_shapes(target_params)
  for name in sorted(set(saved) | set(target)):
    if name not in saved:
      raise ValueError(f"{source}: parameter {name} of this config is missing "
                       "from the checkpoint (different model variant or depth?)")
    if name not in target:
      raise ValueError(f"{source}: checkpoint parameter {name} does not exist "
                       "in this config (different model variant or depth?)")
    if saved[name] != target[name]:
      raise ValueError(f"{source}: parameter {name} has shape {saved[name]} in "
                       f"the checkpoint but {target[name]} in this config")


def _composite_restore(abstract_state, data_iter):
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  return ocp.args.Composite(**items)


class Checkpointer:
  """Saves and restores {state, data} steps under <workdir>/checkpoints."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False, directory: str | None = None):
    self.directory = epath.Path(directory or epath.Path(workdir) / CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iter=None):
    restored = self.manager.restore(step, args=_composite_restore(abstract_state,
                                                                  data_iter))
    return restored["state"]

  def saved_params(self, step: int):
    meta = self.manager.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)
    return tree["params"]

  def restore_latest(self, abstract_state, data_iter=None):
    """(state, step) of the newest readable step, or (None, None) if none."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        return self.restore(step, abstract_state, data_iter), step
      except Exception as e:  # orbax/tensorstore raise many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        logging.error("checkpoint step %d in %s cannot be restored (%s: %s); "
                      "moving it aside and trying the previous step", step,
                      self.directory, type(e).__name__, reason[:300])
        self._set_aside(step)
    if steps:
      raise CheckpointError(f"no checkpoint in {self.directory} could be "
                            f"restored (tried steps {steps}); see the log")
    return None, None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      src = self.directory / str(step)
      if src.exists():
        src.rename(self.directory / f"{step}.unreadable")
    self.manager.reload()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def resolve_checkpoint(path: str) -> tuple[epath.Path, int]:
  """(checkpoints directory, step) for a workdir, checkpoints dir or step dir."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"init_from: {path} does not exist")
  if (p / "state").exists() and re.fullmatch(r"\d+", p.name):
    return p.parent, int(p.name)
  for candidate in (p / CHECKPOINT_DIR, p):
    if candidate.is_dir():
      steps = [int(c.name) for c in candidate.iterdir()
               if re.fullmatch(r"\d+", c.name) and (c / "state").exists()]
      if steps:
        return candidate, max(steps)
  raise FileNotFoundError(f"init_from: no checkpoint found in {path} (expected "
                          f"a workdir with {CHECKPOINT_DIR}/<step>/state)")


def restore_init_from(path: str, abstract_state, data_iter=None
                      ) -> tuple[Any, int, bool]:
  """Restore another run's state (a8 -> a4). Returns (state, step, data_ok)."""
  directory, step = resolve_checkpoint(path)
  source = Checkpointer("", read_only=True, directory=str(directory))
  check_param_shapes(source.saved_params(step), abstract_state.params,
                     f"init_from {directory / str(step)}")
  try:
    state = source.restore(step, abstract_state)
  except Exception as e:
    raise CheckpointError(f"init_from {directory / str(step)}: the optimizer "
                          f"state does not match this config ({type(e).__name__}:"
                          f" {str(e).splitlines()[0][:200]})") from e
  data_ok = False
  if data_iter is not None:
    try:
      source.manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(data_iter)))
      data_ok = True
    except Exception as e:
      logging.warning("init_from: the data iterator state of %s does not fit "
                      "this data pipeline (%s); starting the data stream anew",
                      directory / str(step), type(e).__name__)
  source.close()
  return state, step, data_ok
