"""Storage faults under a running trainer (disk full, quota, permission or
the file system lost): recognised through the wrappers orbax and TensorStore
put around the OS error, and reported as one line that names what failed and
the step a rerun resumes."""
from __future__ import annotations

import errno
import logging

from bitnet_jax import checkpoint as ckpt_lib
from bitnet_jax import rundir
from bitnet_jax.errors import UserError

STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                  errno.EROFS, errno.EIO, errno.ENOENT, errno.ESTALE)
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step not yet committed
STORAGE_MESSAGES = ("No space left on device", "Disk quota exceeded",
                    "Permission denied", "Read-only file system")


def storage_fault(e: BaseException) -> str:
  """'writing PATH failed: REASON' when e (or what caused it: orbax and
  TensorStore wrap the OS error) is the storage failing; '' otherwise."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS and not \
        isinstance(e, UserError):
      where = e.filename or "the workdir"
      return f"writing {where} failed: {e.strerror or e}"
    text = str(e)
    for message in STORAGE_MESSAGES:
      if message in text:
        return f"writing the workdir failed: {message}"
    e = e.__cause__ or e.__context__
  return ""


def last_saved(workdir: str) -> str:
  """What a storage fault leaves: the step a rerun resumes."""
  try:
    _, step = ckpt_lib.resolve_checkpoint(workdir)
  except Exception:  # noqa: BLE001  (no checkpoint, or the store is gone)
    return "no step was saved; nothing to resume"
  return (f"the last saved step is {step}: the same command resumes it once "
          "the storage is back")


def discard_partial_steps(workdir: str) -> None:
  """Remove what a save cut short left (`<step>.orbax-checkpoint-tmp*`): it
  holds the space a full disk needs back, and is never a step a rerun could
  take. Best effort (the store may be gone); orbax also removes such
  directories when the next run opens the checkpoints."""
  directory = rundir.RunDir(workdir).checkpoints
  try:
    for partial in directory.glob(f"*{TMP_SUFFIX}*"):
      partial.rmtree()
      logging.info("removed %s (a save the fault cut short)", partial)
  except Exception:  # noqa: BLE001  (nothing more to do: the rerun cleans up)
    pass
