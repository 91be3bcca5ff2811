"""A jax.profiler trace of a window of training steps
(train.profile_start, train.profile_steps), written into the run's
TensorBoard directory (<workdir>/tensorboard/plugins/profile/<session>/),
where TensorBoard's profile plugin and xprof read it. The window's last step
is waited for before the trace stops, so the trace holds whole steps; every
process traces its own devices. jax's trace writer takes local paths only: a
remote log_dir (gs://) is traced into a local temporary folder that is
uploaded there and deleted when the window closes."""
from __future__ import annotations

import logging
import shutil
import tempfile

import jax

from bitnet_jax import storage


class ProfileWindow:
  """start_trace before step `start`, stop_trace after step start + steps - 1."""

  def __init__(self, start: int, steps: int, log_dir: str):
    self.start, self.stop = start, start + steps
    self.enabled = start >= 0 and steps > 0
    self.log_dir = log_dir
    self.running = False
    self._staging = None

  def before(self, step: int, state) -> None:
    """Called before dispatching `step` (0-based: step N makes update N+1)."""
    if not self.enabled:
      return
    if step == self.start and not self.running:
      if storage.is_remote(self.log_dir):
        self._staging = tempfile.mkdtemp(prefix="bitnet_jax_profile_")
      else:
        storage.makedirs(self.log_dir)
      jax.block_until_ready(state)  # earlier steps stay out of the window
      jax.profiler.start_trace(self._staging or self.log_dir)
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
      if self._staging:
        storage.copy_tree(self._staging, self.log_dir)
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging = None
      logging.info("profile written to %s", self.log_dir)
