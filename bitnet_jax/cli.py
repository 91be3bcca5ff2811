"""The frame of every command (`python -m bitnet_jax.<command>`).

  run(main)                    absl's app.run with the one error boundary: a
                               `bitnet_jax.errors.UserError` prints as one
                               line `error: ...` and exits 1; any other
                               exception is a bug and keeps its traceback.
  define_run_flags()           --workdir (a trained run), --step, --config
  checkpoint_step()            --step as load() takes it (None: latest)
  define_document_flags(p)     which documents to read (--source, --split,
                               --paths, ...), optionally under a prefix
  documents(p)                 those flags as a `perplexity.Documents`

Flags are defined only when a module runs as a program (each command calls
its `define_flags()` under `__main__`), so library functions of every
command can be imported side by side.
"""
from __future__ import annotations

import glob
import os
import sys
import traceback
from typing import Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from bitnet_jax.errors import UserError

FLAGS = flags.FLAGS


flags.DEFINE_bool("verbose", False, "Also show third-party libraries' INFO "
                  "logs (orbax, grain, absl, ...); they are at WARNING by default.")


def local_platforms() -> None:
  """JAX_PLATFORMS=cpu on a host with no TPU and no NVIDIA GPU (unless the
  user set it): an installed libtpu then never probes for a TPU, which
  prints its noise ("Failed to find host bounds", "unexpected worker
  hostname") on every command. A TPU VM (/dev/accel*, /dev/vfio, the
  TPU_ACCELERATOR_TYPE variable) or a GPU host (/dev/nvidia*) keeps JAX's
  own choice."""
  if os.environ.get("JAX_PLATFORMS"):
    return
  tpu = (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
         or os.environ.get("TPU_ACCELERATOR_TYPE"))
  if not tpu and not glob.glob("/dev/nvidia[0-9]*"):
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: it read the variable then
      sys.modules["jax"].config.update("jax_platforms", "cpu")


def guarded(main: Callable) -> Callable:
  """main, with UserError reported as one line and exit status 1; the
  platform chosen and library logs quieted first (--verbose keeps them)."""
  def run_main(argv):
    local_platforms()
    if not (FLAGS.is_parsed() and FLAGS.verbose):
      from bitnet_jax import logs  # the library-log filter
      logs.quiet_library_logs()
      quiet_aftermath()
    try:
      return main(argv)
    except UserError as e:
      report(e, verbose=FLAGS.is_parsed() and FLAGS.verbose)
      sys.exit(1)
  return run_main


def report(e: UserError, verbose: bool) -> None:
  """The one `error:` line; with --verbose first the error behind it (a
  library's whole message and traceback)."""
  if verbose and e.__cause__ is not None:
    traceback.print_exception(e.__cause__, file=sys.stderr)
  print(f"error: {e}", file=sys.stderr, flush=True)


def _aftermath(exc_type, exc) -> bool:
  """An error of an orbax read still pending when a failed restore returned:
  its event loop closed under it, or its coroutine never collected."""
  return (exc_type is RuntimeError and "Event loop is closed" in str(exc)) or (
      "_read_array_index" in "".join(traceback.format_exception(exc))[-2000:])


def quiet_aftermath() -> None:
  """Hooks that drop `_aftermath` errors (TensorStore prints them through
  sys.excepthook from its own threads, Python through sys.unraisablehook at
  exit: hundreds of lines after the one that matters); every other error
  reaches the hook it would have."""
  except_hook, unraisable_hook = sys.excepthook, sys.unraisablehook

  def excepthook(exc_type, exc, tb):
    if not _aftermath(exc_type, exc):
      except_hook(exc_type, exc, tb)

  def unraisablehook(unraisable):
    if not (_aftermath(unraisable.exc_type, unraisable.exc_value) or
            "_read_array_index" in repr(unraisable.object)):
      unraisable_hook(unraisable)
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def run(main: Callable, argv: Sequence[str] | None = None,
        flags_parser: Callable | None = None) -> None:
  """app.run(main) inside the error boundary (absl's UsageError prints the
  usage line, as absl does)."""
  from bitnet_jax import config_files
  kwargs = {"flags_parser": flags_parser} if flags_parser else {}
  app.run(guarded(main), argv=config_files.resolve_argv(argv or sys.argv),
          **kwargs)


def define_run_flags(what: str, *, config: bool = True,
                     several: bool = False) -> None:
  """--workdir (the run `what` reads), --step, and optionally --config."""
  if config:
    config_flags.DEFINE_config_file(
        "config", None, "The run's config (default: <workdir>/config.json, "
        "what training resolved); it must match the checkpoint's shapes.",
        lock_config=False)
  if several:
    flags.DEFINE_list("workdir", None, what)
  else:
    flags.DEFINE_string("workdir", None, what)
  flags.DEFINE_integer("step", -1, "Checkpoint step (-1: latest).")


def checkpoint_step() -> int | None:
  return None if FLAGS.step < 0 else FLAGS.step


def require(*names: str) -> None:
  """UsageError unless every named flag is set."""
  missing = [n for n in names if not FLAGS[n].value]
  if missing:
    raise app.UsageError(" and ".join(f"--{n}" for n in missing) +
                         (" is" if len(missing) == 1 else " are") + " required")


