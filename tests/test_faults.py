"""Faults end in one line and release what they hold: a full disk at a step,
at a save or at the final flush stops the run with an error naming what
failed and the step a rerun resumes; the lease is released, the latest step
is a complete one, and the same command resumes it."""
import errno
import os

import pytest

from bitnet_jax import storage
from bitnet_jax.errors import StorageFault
from bitnet_jax.training import checkpoint as ckpt_lib
from bitnet_jax.training import faults, metrics


def test_storage_faults_are_recognised_through_wrappers():
  full = OSError(errno.ENOSPC, "No space left on device", "/w/metrics.jsonl")
  assert faults.storage_fault(full) == (
      "writing /w/metrics.jsonl failed: No space left on device")
  try:
    try:
      raise full
    except OSError as e:
      raise ValueError("orbax: save failed") from e
  except ValueError as wrapped:
    assert "No space left" in faults.storage_fault(wrapped)
  assert "Permission denied" in faults.storage_fault(
      RuntimeError("tensorstore: Permission denied [source locations]"))
  assert faults.storage_fault(ValueError("a bug")) == ""


def full_disk_after(monkeypatch, writes, name):
  """GrowingFile writes to `name` raise ENOSPC after `writes` of them."""
  real = storage.GrowingFile.write
  count = {"n": 0}

  def write(self, data):
    if self.path.name == name:
      count["n"] += 1
      if count["n"] > writes:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
    return real(self, data)
  monkeypatch.setattr(storage.GrowingFile, "write", write)


@pytest.mark.slow
@pytest.mark.parametrize("name,writes", [("metrics.jsonl", 3),
                                         ("train.log", 6)])
def test_full_disk_stops_with_one_line_and_resumes(tmp_path, corpus_file,
                                                   monkeypatch, name, writes):
  from bitnet_jax.training import trainer
  from conftest import small_run_config
  workdir = str(tmp_path / "run")
  config = small_run_config(corpus_file, **{"train.stop_step": 12,
                                            "train.ckpt_every": 4,
                                            "train.log_every": 2})
  import logging
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.INFO)  # what the CLI logs
  full_disk_after(monkeypatch, writes, name)
  with pytest.raises(StorageFault, match=r"No space left on device.*"
                     r"(last saved step is \d+|no step was saved)"):
    trainer.train(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "train.lock"))
  monkeypatch.undo()
  root.setLevel(level)
  metrics.close_log_file()
  saved = ckpt_lib.has_checkpoint(workdir) and ckpt_lib.resolve_checkpoint(
      workdir)[1]
  summary = trainer.train(config, workdir)
  assert summary["final_step"] == 12
  assert summary["start_step"] == (saved or 0)
