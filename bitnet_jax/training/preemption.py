"""Stopping a run at a step boundary, agreed by every process.

SIGTERM (a preemption notice, SLURM's --signal, a TPU maintenance event) or
Ctrl-C sets a flag in the process that received it. A single-process run
saves and exits after the step in flight. In a multi-process run the orbax
save is a collective, so every process must stop after the *same* step: every
`train.preemption_check_every` steps the processes all-gather their flags
(one tiny collective and a host sync on that step) and stop together when
any flag is set. JAX's own preemption sync point (the coordination service's
notice, through orbax's reached_preemption) is honoured as well.
"""
from __future__ import annotations

import logging
import signal

import jax
import numpy as np

DEFAULT_EVERY = 10


class Preemption:
  """SIGTERM / SIGINT set a flag; `agreed(step)` says when all processes stop."""

  def __init__(self, install: bool = True, every: int = DEFAULT_EVERY):
    self.requested = False
    self.every = every
    if install:
      for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    logging.warning("signal %d: saving a checkpoint at the next agreed step",
                    signum)
    self.requested = True

  def agreed(self, done: int) -> bool:
    """Whether every process stops after update `done` (call on every step,
    in step order, on every process)."""
    if jax.process_count() == 1:
      return self.requested
    if done % max(1, self.every):
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    stop = bool(np.max(flags))
    if stop and not self.requested:
      logging.warning("another process was signalled: stopping after step %d",
                      done)
    return stop
