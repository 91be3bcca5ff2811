"""Where a run's files live: a local path, or any file system `etils.epath`
reaches (gs://BUCKET/... through gcsfs, the way orbax stores its metadata;
orbax writes the arrays themselves through TensorStore's own GCS driver).

Object stores have no append and no rename. The files that grow during a run
(metrics.jsonl, train.log, TensorBoard event files) are therefore
`GrowingFile`s: appended on a local disk; on a remote store kept in memory and
rewritten whole, at most every `REMOTE_FLUSH_S` seconds and on close. A remote
file of a few MB rewritten twice a minute costs the trainer nothing visible.

Writers that only take a local path (jax.profiler's C++ trace writer) write
into a local temporary folder that `copy_tree` uploads (profiling.py).
"""
from __future__ import annotations

import io
import json
import logging
import os
import time

from etils import epath

REMOTE_FLUSH_S = 30.0


def is_remote(path) -> bool:
  """True for a URL with a scheme other than file:// (gs://, s3://, ...)."""
  text = os.fspath(path)
  return "://" in text and not text.startswith("file://")


def makedirs(path) -> epath.Path:
  p = epath.Path(path)
  p.mkdir(parents=True, exist_ok=True)
  return p


class GrowingFile:
  """A file written by appending (bytes or text), local or remote."""

  def __init__(self, path, flush_every_s: float = REMOTE_FLUSH_S):
    self.path = epath.Path(path)
    self.remote = is_remote(path)
    self.flush_every_s = flush_every_s
    if self.remote:
      self._data = bytearray(self.path.read_bytes() if self.path.exists()
                             else b"")
      self._dirty = False
      self._last = time.monotonic()
    else:
      self._file = open(self.path, "ab")
    self.closed = False

  def write(self, data: bytes | str) -> None:
    if isinstance(data, str):
      data = data.encode("utf-8")
    if self.remote:
      self._data += data
      self._dirty = True
    else:
      self._file.write(data)

  def flush(self, force: bool = False) -> None:
    """Local: flush to the OS. Remote: rewrite the object when `force`d or
    when the last rewrite is older than `flush_every_s`."""
    if self.closed:
      return
    if not self.remote:
      self._file.flush()
      return
    if self._dirty and (force or time.monotonic() - self._last
                        >= self.flush_every_s):
      self.path.write_bytes(bytes(self._data))
      self._dirty = False
      self._last = time.monotonic()

  def close(self) -> None:
    if self.closed:
      return
    self.flush(force=True)
    if not self.remote:
      self._file.close()
    self.closed = True


class GrowingFileHandler(logging.Handler):
  """A logging handler appending to a GrowingFile (train.log on any store).

  A remote store is written only by `sync`, never inside `emit`, `flush` or
  `close`: those run under the handler's lock, and the store's client logs
  from its own I/O thread (which would wait for that lock: a deadlock). Nor
  at interpreter exit, when the client's executors are already shut down:
  the trainer syncs with its metrics and when it stops."""

  def __init__(self, path):
    super().__init__()
    self.file = GrowingFile(path)
    self.failed: OSError | None = None  # the write that failed (disk full)

  def emit(self, record: logging.LogRecord) -> None:
    if self.failed is not None:
      return  # one failure is reported (sync raises it), not one per record
    try:
      self.file.write(self.format(record) + "\n")
      if not self.file.remote:
        self.file.flush()
    except OSError as e:
      self.failed = e
    except Exception:  # logging must not raise into the caller
      self.handleError(record)

  def sync(self, force: bool = False) -> None:
    """Write the log to a remote store (throttled unless `force`); raise the
    write that failed, if one did."""
    if self.failed is not None:
      raise self.failed
    if self.file.remote:
      self.file.flush(force)

  def close(self) -> None:
    if not self.file.remote:
      self.file.close()
    super().close()


class _TensorBoardFiles:
  """tensorboardX's writer factory interface over GrowingFile."""

  @staticmethod
  def directory_check(path: str) -> None:
    makedirs(path)

  @staticmethod
  def open(path: str) -> GrowingFile:
    return GrowingFile(path)


def tensorboard_logdir(path) -> str:
  """`path` as tensorboardX's SummaryWriter takes it; a remote scheme is
  routed through GrowingFile (tensorboardX itself writes only local files,
  or gs:// through google-cloud-storage with its own credentials logic)."""
  text = os.fspath(path)
  if is_remote(text):
    from tensorboardX import record_writer
    scheme = text.split("://", 1)[0]
    record_writer.REGISTERED_FACTORIES[scheme] = _TensorBoardFiles
  return text


def copy_tree(src: str, dst) -> None:
  """Copy a local directory's files under `dst` (any epath store)."""
  dst = epath.Path(dst)
  for root, _, files in os.walk(src):
    rel = os.path.relpath(root, src)
    target = dst if rel == "." else dst / rel
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        (target / name).write_bytes(f.read())


def write_figure(fig, path) -> None:
  """Save a matplotlib figure as PNG to any store."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  epath.Path(path).write_bytes(buf.getvalue())


def _safetensors(framework: str):
  import importlib
  return importlib.import_module(f"safetensors.{framework}")


def save_safetensors(tensors: dict, path, metadata: dict | None = None,
                     framework: str = "numpy") -> int:
  """Write arrays (numpy, or jax for bfloat16: framework="flax") as a
  safetensors file on any store; returns its size in bytes."""
  st = _safetensors(framework)
  if is_remote(path):
    data = st.save(tensors, metadata=metadata)
    epath.Path(path).write_bytes(data)
    return len(data)
  st.save_file(tensors, os.fspath(path), metadata=metadata)
  os.chmod(path, default_file_mode())  # safetensors writes 0600
  return os.path.getsize(path)


def default_file_mode() -> int:
  """The mode a new file gets under this process's umask (0644 under 022)."""
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def load_safetensors(path, framework: str = "numpy") -> tuple[dict, dict]:
  """(arrays, metadata) of a safetensors file on any store. Raises
  safetensors' SafetensorError, OSError or ValueError for a bad file."""
  from safetensors import safe_open
  st = _safetensors(framework)
  if is_remote(path):
    data = epath.Path(path).read_bytes()
    if len(data) < 8:
      raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    return st.load(data), header.get("__metadata__") or {}
  with safe_open(os.fspath(path), "numpy") as f:
    meta = f.metadata() or {}
  return st.load_file(os.fspath(path)), meta


def same_path(a, b) -> bool:
  """Whether two paths name the same place (local paths made absolute)."""
  def norm(p):
    text = os.fspath(p)
    return text.rstrip("/") if is_remote(text) else os.path.abspath(text)
  return norm(a) == norm(b)


def write_atomic(path, data: bytes | str) -> None:
  """Replace a file whole: a reader never sees a partial one (an object
  store replaces objects whole; a local file goes through a renamed temp)."""
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  data = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(p):
    p.write_bytes(data)
    return
  tmp = p.parent / f"{p.name}.{os.getpid()}.tmp"
  tmp.write_bytes(data)
  tmp.replace(p)
