"""Where a `--config` file is: the path as given when it exists; else the
same name among the configs that ship with the package (the repository's
configs/, installed as `bitnet_jax.configs`), so that
`python -m bitnet_jax.train --config=configs/tiny.py` works from any
directory once the package is installed."""
from __future__ import annotations

import os
from typing import Sequence

FLAG = "--config"


def packaged_dir() -> str | None:
  """The shipped configs: bitnet_jax.configs when installed, else the
  configs/ folder beside the package (a source checkout)."""
  try:
    import bitnet_jax.configs as shipped
    return list(shipped.__path__)[0]
  except ImportError:
    here = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs")
    return here if os.path.isdir(here) else None


def resolve(path: str) -> str:
  """`path` if it names a file (or a remote store); else the shipped config
  of that name (`configs/tiny.py`, `tiny.py`, `configs/tiny.py:arg`)."""
  file, sep, arg = path.partition(":")
  if "://" in path or os.path.exists(file):
    return path
  shipped = packaged_dir()
  name = file[len("configs/"):] if file.startswith("configs/") else file
  candidate = os.path.join(shipped, name) if shipped else ""
  if candidate and os.path.isfile(candidate):
    return candidate + sep + arg
  return path


def resolve_argv(argv: Sequence[str]) -> list[str]:
  """argv with its --config=FILE (or --config FILE) resolved."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(FLAG + "="):
      out[i] = FLAG + "=" + resolve(arg[len(FLAG) + 1:])
    elif arg == FLAG and i + 1 < len(out):
      out[i + 1] = resolve(out[i + 1])
  return out
