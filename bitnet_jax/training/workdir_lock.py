"""One trainer per run directory: a lease file with host, pid and heartbeat.

`WorkdirLock(workdir).acquire()` writes `<workdir>/train.lock` (JSON: host,
pid, started, heartbeat) and a daemon thread refreshes the heartbeat every
`HEARTBEAT_S` seconds until `release()`. A second trainer on the same workdir
finds a live lease and stops with one line naming the holder. A lease is
stale (taken over, with a warning) when its process is gone (same host) or
its heartbeat is older than `STALE_S` (another host, e.g. a preempted VM).
In a multi-process run only process 0 holds the lease.

On an object store (gs://) there is no exclusive create: the lease is written,
then read back after `SETTLE_S`, and a starter that finds another's lease
there backs off. Two trainers started within that window on the same remote
workdir are not reliably kept apart.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from etils import epath

from bitnet_jax import rundir, storage
from bitnet_jax.errors import UserError

LOCK_NAME = rundir.LOCK
HEARTBEAT_S = 30.0
STALE_S = 300.0
SETTLE_S = 1.0


class WorkdirBusy(UserError, RuntimeError):
  """Another live trainer holds the workdir (reported as one line)."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.fspath(rundir.RunDir(workdir) / rundir.LOCK)
    self.remote = storage.is_remote(self.path)
    self.enabled = enabled
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._lease = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.time()}

  def holder(self) -> dict | None:
    try:
      return json.loads(epath.Path(self.path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
      return None

  def _mine(self, lease: dict) -> bool:
    return (lease.get("host"), lease.get("pid"), lease.get("started")) == (
        self._lease["host"], self._lease["pid"], self._lease["started"])

  def _is_live(self, lease: dict) -> bool:
    if lease.get("host") == self._lease["host"]:
      return lease.get("pid") != os.getpid() and _alive(int(lease.get("pid", 0)))
    return time.time() - float(lease.get("heartbeat", 0)) < STALE_S

  def _write(self) -> None:
    """Replace the lease whole: a reader never sees a partial one."""
    storage.write_atomic(self.path,
                         json.dumps(dict(self._lease, heartbeat=time.time())))

  def acquire(self) -> None:
    if not self.enabled:
      return
    for _ in range(50):
      lease = self.holder()
      if lease is None and self.remote:
        self._write()
        time.sleep(SETTLE_S)
        lease = self.holder()
        if lease is None or not self._mine(lease):
          continue  # another starter wrote after us: its lease decides
      elif lease is None:
        # Create-exclusive: of two starters racing here, one wins; the other
        # reads the winner's lease on its next pass.
        try:
          os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
          time.sleep(0.1)  # the winner is writing its lease
          continue
      elif self._is_live(lease):
        raise WorkdirBusy(
            f"{epath.Path(self.path).parent} is in use by another trainer (host "
            f"{lease.get('host')}, pid {lease.get('pid')}, heartbeat "
            f"{time.time() - float(lease.get('heartbeat', 0)):.0f} s ago); "
            f"stop it first, or delete {self.path} if it is gone")
      else:
        logging.warning("taking over the stale lease %s (host %s, pid %s)",
                        self.path, lease.get("host"), lease.get("pid"))
      self._write()
      self._thread = threading.Thread(target=self._beat, daemon=True,
                                      name="workdir-lease")
      self._thread.start()
      return
    raise WorkdirBusy(f"{self.path} exists but holds no lease; delete it if "
                      "no trainer is running")

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self._write()
      except OSError as e:  # keep training; the next beat retries
        logging.warning("cannot refresh %s: %s", self.path, e)

  def release(self) -> None:
    if not self.enabled or self._thread is None:
      return
    self._stop.set()
    self._thread.join(timeout=5)
    lease = self.holder()
    if lease and self._mine(lease):
      epath.Path(self.path).unlink()
