"""JAX's persistent compilation cache (train.compile_cache_dir).

A restarted or resumed run loads its compiled train / eval steps from disk
instead of recompiling them. The default directory is under the user's cache
directory ($XDG_CACHE_HOME or ~/.cache)/bitnet_jax/xla, or the one JAX's own
JAX_COMPILATION_CACHE_DIR names; an empty string turns the cache off. A
gs:// directory (JAX reads and writes it through etils.epath) is shared by
every host of a pod.
Executables are keyed by the program, the compiler version and flags, so a
changed config or library compiles anew.
"""
from __future__ import annotations

import logging
import os

import jax

from bitnet_jax import storage

DEFAULT = "default"


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "bitnet_jax", "xla")


def enable(setting: str) -> str:
  """Point JAX's persistent cache at `setting` ('default': the directory in
  $JAX_COMPILATION_CACHE_DIR if set, else default_dir(); '': off). Returns
  the directory in use ('' when off)."""
  path = setting
  if setting == DEFAULT:
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir()
  if not path:
    jax.config.update("jax_compilation_cache_dir", None)
    return ""
  storage.makedirs(path)
  jax.config.update("jax_compilation_cache_dir", path)
  # every step program is worth keeping, however fast it compiled (unless
  # the environment says otherwise)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  logging.info("compilation cache: %s", path)
  return path
