"""One trainer per workdir: a live lease refuses, a stale one is taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from bitnet_jax.training import trainer
from bitnet_jax.training import workdir_lock

from conftest import small_run_config


def write_lease(workdir, pid, host=None, age=0.0):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lock.LOCK_NAME), "w") as f:
    json.dump({"host": host or socket.gethostname(), "pid": pid,
               "started": time.time() - age, "heartbeat": time.time() - age}, f)


def dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_live_lease_refuses_and_stale_lease_is_taken_over(tmp_path, caplog):
  workdir = str(tmp_path)
  write_lease(workdir, os.getppid())  # a live process on this host
  with pytest.raises(workdir_lock.WorkdirBusy, match="is in use by another "
                     f"trainer .*pid {os.getppid()}"):
    workdir_lock.WorkdirLock(workdir).acquire()
  write_lease(workdir, dead_pid())
  lock = workdir_lock.WorkdirLock(workdir)
  lock.acquire()
  assert "taking over the stale lease" in caplog.text
  assert lock.holder()["pid"] == os.getpid()
  lock.release()
  assert not os.path.exists(lock.path)
  # another host: live while its heartbeat is recent, stale after STALE_S
  write_lease(workdir, 1, host="elsewhere", age=10)
  with pytest.raises(workdir_lock.WorkdirBusy):
    workdir_lock.WorkdirLock(workdir).acquire()
  write_lease(workdir, 1, host="elsewhere", age=workdir_lock.STALE_S + 1)
  lock = workdir_lock.WorkdirLock(workdir)
  lock.acquire()
  lock.release()


def test_a_second_trainer_on_a_busy_workdir_writes_nothing(tmp_path, corpus_file):
  """While another trainer holds the workdir, train() stops before writing a
  config, a tokenizer or a metric line."""
  workdir = str(tmp_path)
  write_lease(workdir, os.getppid())
  with pytest.raises(workdir_lock.WorkdirBusy):
    trainer.train(small_run_config(corpus_file, **{"train.stop_step": 2}),
                  workdir)
  assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_NAME]
