"""What a restart of a workdir, or a continuation of another run, checks
before compiling and records once it runs: the run's identity
(run_identity.py) and the config changes it allows."""
from __future__ import annotations

import logging

import jax

from bitnet_jax import rundir, run_identity
from bitnet_jax.errors import MissingInput
from bitnet_jax import checkpoint as ckpt_lib
from bitnet_jax.run_config import RunConfig


def check_identity(run: RunConfig, workdir: str) -> list[tuple]:
  """Refuse a restart or an init_from that changes what the run is
  (run_identity.py, which compares config.json layouts); the other fields
  this restart changes."""
  directory, config = rundir.RunDir(workdir), run.to_config()
  if ckpt_lib.has_checkpoint(workdir) and (directory / rundir.CONFIG).exists():
    return run_identity.check_restart(directory.read_config(), config, workdir)
  if run.init_from:
    try:
      ckpt_lib.resolve_checkpoint(run.init_from)
    except FileNotFoundError as e:
      raise MissingInput(f"init_from: {e}") from None
    run_identity.check_init_from(run_identity.source_config(run.init_from),
                                 config, run.init_from)
  return []


def note_config_changes(workdir: str, step: int, changes, writer) -> None:
  """A restart's allowed config changes: train.log, a config_change row in
  metrics.jsonl, and config_history.jsonl (config.json holds the new ones)."""
  for field, old, new in changes:
    logging.info("config change at step %d: %s %r -> %r", step, field, old, new)
  writer.mark(step, {"config_change": {k: {"old": o, "new": n}
                                       for k, o, n in changes}})
  if jax.process_index() == 0:
    run_identity.record_changes(rundir.RunDir(workdir).path, step, changes)
