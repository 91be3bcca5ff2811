"""A jax.profiler trace of a window of training steps
(train.profile_start, train.profile_steps), written into the run's
TensorBoard directory (<workdir>/tensorboard/plugins/profile/<session>/),
where TensorBoard's profile plugin and xprof read it. The window's last step
is waited for before the trace stops, so the trace holds whole steps; every
process traces its own devices."""
from __future__ import annotations

import logging
import os

import jax


class ProfileWindow:
  """start_trace before step `start`, stop_trace after step start + steps - 1."""

  def __init__(self, start: int, steps: int, log_dir: str):
    self.start, self.stop = start, start + steps
    self.enabled = start >= 0 and steps > 0
    self.log_dir = log_dir
    self.running = False

  def before(self, step: int, state) -> None:
    """Called before dispatching `step` (0-based: step N makes update N+1)."""
    if not self.enabled:
      return
    if step == self.start and not self.running:
      if "://" not in self.log_dir:
        os.makedirs(self.log_dir, exist_ok=True)
      jax.block_until_ready(state)  # earlier steps stay out of the window
      jax.profiler.start_trace(self.log_dir)
      self.running = True
      logging.info("profiling steps %d..%d into %s", self.start + 1,
                   self.stop, self.log_dir)
    elif step == self.stop:
      self.close(state)

  def close(self, state) -> None:
    if self.running:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.running = False
      logging.info("profile written to %s", self.log_dir)
