"""The process's logging: third-party libraries quieted (their INFO
dropped, their tracebacks kept for train.log), and a run's train.log
handler (process 0, any store)."""
from __future__ import annotations

import logging

from bitnet_jax import rundir, storage

# warnings that say what the project asked for (a read-only checkpoint reader)
_EXPECTED = ("Given directory is read only",)
_NOISY = ("/orbax/", "/grain/", "/jax/_src/", "/tensorflow_datasets/", "/etils/",
          "/gguf/")


class _LibraryInfoFilter(logging.Filter):
  """Drop INFO (and DEBUG) records of chatty libraries; keep their warnings.
  A library's error keeps its first line; its traceback (orbax's background
  save thread logs one per failed commit) goes to train.log alone: the
  `error:` line the command ends with says what failed."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not any(part in record.pathname for part in _NOISY):
      return True
    if record.levelno < logging.WARNING or record.getMessage().startswith(
        _EXPECTED):
      return False
    if record.exc_info:
      first = record.getMessage().splitlines()[0]
      log_file_only(f"the traceback of the next line ({record.name}):\n" +
                    logging.Formatter().formatException(record.exc_info),
                    record.levelno)
      record.msg, record.args = first, None
      record.exc_info = record.exc_text = None
    return True


FILTER = _LibraryInfoFilter()  # on the root and absl loggers, and their handlers


def quiet_library_logs() -> None:
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    if FILTER not in handler.filters:
      handler.addFilter(FILTER)
  for logger in (logging.getLogger(), logging.getLogger("absl")):
    if FILTER not in logger.filters:
      logger.addFilter(FILTER)


_FILE_HANDLER: list[storage.GrowingFileHandler] = []


def log_file_only(message: str, level: int = logging.INFO) -> None:
  """A record for train.log alone (the full config, a library's traceback:
  too long for the console, where the run's summary lines stand)."""
  record = logging.LogRecord("bitnet_jax", level, __file__, 0, message,
                             None, None)
  for handler in _FILE_HANDLER:
    handler.handle(record)


def sync_log_file(force: bool = False) -> None:
  """train.log onto a remote store (throttled unless forced; a no-op for a
  local file, which every record is flushed to)."""
  for handler in _FILE_HANDLER:
    handler.sync(force)


def close_log_file() -> None:
  """Stop writing train.log, after writing what it holds (a remote store
  that cannot be reached any more is reported, not raised: the run itself
  is saved in its checkpoints)."""
  root = logging.getLogger()
  while _FILE_HANDLER:
    old = _FILE_HANDLER.pop()
    root.removeHandler(old)
    try:
      old.sync(force=True)
      old.close()
    except Exception as e:  # the store's client raises its own types
      logging.warning("could not write %s: %s", old.file.path, e)


def log_to_file(workdir: str, enabled: bool = True) -> None:
  """Also append the log to <workdir>/train.log (process 0 only: on an object
  store each writer rewrites the whole file, so a second one would clobber)."""
  close_log_file()
  if not enabled:
    return
  root = logging.getLogger()
  handler = storage.GrowingFileHandler(rundir.RunDir(workdir) / rundir.LOG)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  handler.addFilter(FILTER)
  root.addHandler(handler)
  _FILE_HANDLER.append(handler)
