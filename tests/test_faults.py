"""Faults end in one line and release what they hold: a full disk (a lost
permission, a store gone: a save cut short) at a step,
at a save or at the final flush stops the run with an error naming what
failed and the step a rerun resumes; the lease is released, the latest step
is a complete one, and the same command resumes it."""
import errno
import os

import pytest

from bitnet_jax import storage
from bitnet_jax.errors import StorageFault
from bitnet_jax import checkpoint as ckpt_lib
from bitnet_jax import logs
from bitnet_jax.training import faults


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
  logs.close_log_file()
  saved = ckpt_lib.has_checkpoint(workdir) and ckpt_lib.resolve_checkpoint(
      workdir)[1]
  summary = trainer.train(config, workdir)
  assert summary["final_step"] == 12
  assert summary["start_step"] == (saved or 0)


def failing_save_of(monkeypatch, step, err):
  """Every file orbax writes for `step` (its metadata, through epath) raises
  OSError(err): the disk filling, the permission lost or the store gone in
  the middle of a save."""
  from etils import epath
  real = epath.Path.write_text

  def write_text(self, *args, **kwargs):
    if f"/{step}{faults.TMP_SUFFIX}" in os.fspath(self):
      raise OSError(err, os.strerror(err), os.fspath(self))
    return real(self, *args, **kwargs)
  monkeypatch.setattr(epath.Path, "write_text", write_text)


@pytest.mark.slow
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, errno.ESTALE])
def test_a_save_cut_short_leaves_no_partial_step(tmp_path, corpus_file,
                                                 monkeypatch, err):
  from bitnet_jax.training import trainer
  from conftest import small_run_config
  workdir = str(tmp_path / "run")
  config = small_run_config(corpus_file, **{"train.stop_step": 12,
                                            "train.ckpt_every": 4})
  failing_save_of(monkeypatch, 8, err)
  with pytest.raises(StorageFault, match=(
      rf"/checkpoints/8{faults.TMP_SUFFIX}.* failed: {os.strerror(err)}; "
      r"the last saved step is 4: the same command resumes it")):
    trainer.train(config, workdir)
  monkeypatch.undo()
  logs.close_log_file()
  assert not os.path.exists(os.path.join(workdir, "train.lock"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  summary = trainer.train(config, workdir)
  assert (summary["start_step"], summary["final_step"]) == (4, 12)


def test_a_library_traceback_goes_to_the_log_file_only(tmp_path):
  import logging
  import sys
  logs.log_to_file(str(tmp_path))
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
      record = logging.LogRecord(
          "absl", logging.ERROR, "/site-packages/orbax/checkpoint/x.py", 1,
          "Failed to run %d Handler Commit operations\ndetail", (3,),
          sys.exc_info())
    assert logs.FILTER.filter(record)
  finally:
    logs.close_log_file()
  assert (record.getMessage(), record.exc_info) == (
      "Failed to run 3 Handler Commit operations", None)
  log = (tmp_path / "train.log").read_text()
  assert "Traceback (most recent call last)" in log and "Errno 28" in log
