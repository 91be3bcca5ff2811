"""Orbax checkpoints: one step = train state + data-iterator state.

`Checkpointer` wraps an `ocp.CheckpointManager` over `<workdir>/checkpoints`
(keep-N, asynchronous saves). Each step directory holds two items: `state`
(step, params, optimizer state; restored straight onto the target shardings)
and `data` (grain's JSON iterator state, one file per process).

Start-up resumes the latest readable step. A saved state that is not this
config's (another width, another optimizer setting) stops with one line and
nothing is changed; a transient read error stops likewise. Only a step whose
own files cannot be read (truncated, corrupted) is set aside, renamed
`<step>.unreadable-<n>`, and the previous step tried; with steps set aside and
none left, a fresh start needs train.allow_fresh_start.

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

from bitnet_jax import rundir
from bitnet_jax import errors
from bitnet_jax.errors import ConfigError, MissingInput, UserError

CHECKPOINT_DIR = rundir.CHECKPOINTS


class CheckpointError(UserError, RuntimeError):
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
      raise ConfigError(f"{source}: parameter {name} of this config is missing "
                       "from the checkpoint (different model variant or depth?)")
    if name not in target:
      raise ConfigError(f"{source}: checkpoint parameter {name} does not exist "
                       "in this config (different model variant or depth?)")
    if saved[name] != target[name]:
      raise ConfigError(f"{source}: parameter {name} has shape {saved[name]} in "
                       f"the checkpoint but {target[name]} in this config")


_TRANSIENT = ("PERMISSION_DENIED", "Permission denied", "UNAVAILABLE",
              "DEADLINE_EXCEEDED", "timed out", "Connection reset")


def _is_transient(e: Exception) -> bool:
  return isinstance(e, (PermissionError, TimeoutError, ConnectionError)) or any(
      t in str(e) for t in _TRANSIENT)


def _is_mismatch(e: Exception) -> bool:
  return isinstance(e, ValueError) and "do not match" in str(e)


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
        max_to_keep=keep if keep > 0 and not read_only else None,
        save_interval_steps=0 if read_only else 1,  # (orbax warns otherwise)
        enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only,  # a save cut short leaves <step>.orbax-...-tmp:
        cleanup_tmp_directories=not read_only)  # removed at the next start
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

  def saved_leaves(self, step: int) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every array of a saved state, in tree order."""
    meta = self.manager.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)
    return [(tuple(l.shape), str(l.dtype)) for l in jax.tree.leaves(tree)
            if hasattr(l, "shape")]

  def check_compatible(self, step: int, abstract_state) -> None:
    """Refuse (one line, nothing renamed) a saved state that is not this
    config's: the first parameter whose name or shape differs, else the
    optimizer state's layout (e.g. another opt.grad_clip or optimizer)."""
    where = f"checkpoint step {step} in {self.directory}"
    fix = ("resume with the settings the run was started with (its "
           "config.json), or start a new run in another --workdir")
    try:
      saved_params, saved = self.saved_params(step), self.saved_leaves(step)
    except Exception:  # unreadable metadata: restore_latest sets it aside
      return
    try:
      check_param_shapes(saved_params, abstract_state.params, where)
    except ValueError as e:
      raise CheckpointError(f"{e}; {fix}") from None
    target = [(tuple(l.shape), str(l.dtype)) for l in jax.tree.leaves(abstract_state)]
    if sorted(saved) != sorted(target):
      raise CheckpointError(
          f"{where}: the saved optimizer state has {len(saved)} arrays, this "
          f"config's has {len(target)} (different opt settings, e.g. "
          f"opt.grad_clip or the optimizer); {fix}")

  def restore_latest(self, abstract_state, data_iter=None,
                     allow_fresh_start: bool = False):
    """(state, step) of the newest readable step, or (None, None) if none.

    A saved state that does not match this config stops with one line and
    changes nothing. A step whose files cannot be read is set aside (renamed
    `<step>.unreadable-<n>`) and the previous step tried; a transient error
    (permission, unavailable storage) stops without renaming. With steps set
    aside and none left, starting over needs `allow_fresh_start`."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if steps:
      self.check_compatible(steps[0], abstract_state)
    for step in steps:
      try:
        return self.restore(step, abstract_state, data_iter), step
      except Exception as e:  # orbax/tensorstore raise many types
        reason = errors.reason(e)
        where = f"checkpoint step {step} in {self.directory}"
        if _is_transient(e):
          raise CheckpointError(f"{where} could not be read now ({reason}); "
                                "nothing was changed: retry when the storage "
                                "answers") from e
        if _is_mismatch(e):
          raise CheckpointError(
              f"{where} does not match this config ({reason}); resume with "
              "the settings the run was started with (its config.json: e.g. "
              "opt.grad_clip), or start a new run in another --workdir"
              ) from e
        logging.error("%s cannot be restored (%s); setting it aside and "
                      "trying the previous step", where, reason)
        self._set_aside(step)
    aside = self.set_aside_steps()
    if aside and not allow_fresh_start:
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be restored; unreadable steps "
          f"set aside: {', '.join(aside)}. Refusing to start from step 0: set "
          "--config.train.allow_fresh_start=true to do so, or repair them")
    return None, None

  def set_aside_after(self, step: int) -> None:
    """train.restore_step: make `step` the latest by renaming every newer
    step `<n>.after-restore-<step>` (kept, never deleted). A rerun with the
    same setting after training went on past it changes nothing (the file
    `restored.after-restore-<step>` says it was done)."""
    steps = sorted(self.manager.all_steps())
    if step not in steps:
      raise CheckpointError(
          f"train.restore_step={step}: no such step in {self.directory} "
          f"(saved: {', '.join(map(str, steps)) or 'none'})")
    marker = f".after-restore-{step}"
    if any(p.name.endswith(marker) for p in self.directory.iterdir()):
      logging.info("train.restore_step=%d was done by an earlier session; "
                   "resuming the latest step", step)
      return
    newer = [s for s in steps if s > step]
    if jax.process_index() == 0:
      for s in newer:
        (self.directory / str(s)).rename(self.directory / f"{s}{marker}")
      # the mark that it was done, also when nothing was newer: a later rerun
      # with the same flag must not set aside the steps trained since
      (self.directory / f"restored{marker}").write_text(
          f"steps set aside: {newer}\n")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("restore_step")
    self.manager.reload()
    logging.warning("train.restore_step=%d: set aside the newer steps %s as "
                    "<step>%s", step, newer, marker)

  def set_aside_steps(self) -> list[str]:
    if not self.directory.exists():
      return []
    return sorted(p.name for p in self.directory.iterdir()
                  if re.fullmatch(r"\d+\.unreadable(-\d+)?", p.name))

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      src = self.directory / str(step)
      if src.exists():
        n = 0
        while (self.directory / f"{step}.unreadable-{n}").exists():
          n += 1
        src.rename(self.directory / f"{step}.unreadable-{n}")
    self.manager.reload()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def has_checkpoint(workdir: str) -> bool:
  """Whether a workdir holds a saved step (its run would resume)."""
  d = epath.Path(workdir) / CHECKPOINT_DIR
  return d.is_dir() and any(re.fullmatch(r"\d+", c.name) for c in d.iterdir())


def resolve_checkpoint(path: str) -> tuple[epath.Path, int]:
  """(checkpoints directory, step) for a workdir, checkpoints dir or step dir."""
  p = epath.Path(path)
  if not p.exists():
    raise MissingInput(f"{path} does not exist")
  if (p / "state").exists() and re.fullmatch(r"\d+", p.name):
    return p.parent, int(p.name)
  for candidate in (p / CHECKPOINT_DIR, p):
    if candidate.is_dir():
      steps = [int(c.name) for c in candidate.iterdir()
               if re.fullmatch(r"\d+", c.name) and (c / "state").exists()]
      if steps:
        return candidate, max(steps)
  raise MissingInput(f"no checkpoint found in {path} (expected a run "
                          f"directory with {CHECKPOINT_DIR}/<step>/state)")


def check_init_from(path: str, abstract_state) -> None:
  """ValueError naming the first parameter of another run's latest step that
  does not fit this config (before anything is copied from that run)."""
  directory, step = resolve_checkpoint(path)
  source = Checkpointer("", read_only=True, directory=str(directory))
  try:
    check_param_shapes(source.saved_params(step), abstract_state.params,
                       f"init_from {directory / str(step)}")
  finally:
    source.close()


def init_from_params(path: str):
  """The saved parameter tree (metadata, nothing read) of another run."""
  directory, step = resolve_checkpoint(path)
  source = Checkpointer("", read_only=True, directory=str(directory))
  try:
    return source.saved_params(step)
  finally:
    source.close()


def restore_init_from(path: str, abstract_state, data_iter=None
                      ) -> tuple[Any, int, bool]:
  """Restore another run's state (a8 -> a4). Returns (state, step, data_ok)."""
  directory, step = resolve_checkpoint(path)
  check_init_from(path, abstract_state)
  source = Checkpointer("", read_only=True, directory=str(directory))
  try:
    state = source.restore(step, abstract_state)
  except Exception as e:
    raise CheckpointError(f"init_from {directory / str(step)}: the optimizer "
                          f"state does not match this config "
                          f"({errors.reason(e)})") from e
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
