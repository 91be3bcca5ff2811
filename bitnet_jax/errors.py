"""The project's user errors: what a command reports as one line.

Everything a user can fix (a config field, a flag, a path, a corpus, a run
directory, a damaged checkpoint, a diverged run) raises a `UserError`; the
command-line frame (`bitnet_jax.cli`) prints those as `error: ...` and exits
with status 1. Any other exception is a bug and keeps its traceback. The
subclasses also derive from the matching built-in, so callers that catch
ValueError or FileNotFoundError keep working.
"""


class UserError(Exception):
  """Bad input or state the user can fix: reported as one line."""


class ConfigError(UserError, ValueError):
  """A config field or command-line flag outside what it allows."""


class InputError(UserError, ValueError):
  """Input data (corpus, prompts, tokenizer, files) that cannot be used."""


class MissingInput(UserError, FileNotFoundError):
  """A file, run directory or checkpoint that is not there."""


class MissingField(UserError, KeyError):
  """A record without a field the config names (e.g. data.text_field)."""

  def __str__(self):  # KeyError would quote the message
    return str(self.args[0]) if self.args else ""


class Diverged(UserError, FloatingPointError):
  """The loss or the parameters became non-finite."""


class StorageFault(UserError, OSError):
  """The run's storage failed under it (full, read-only, permission lost,
  gone): what was saved is safe, the run stopped."""


def reason(e: BaseException, limit: int = 160) -> str:
  """A library's error as a short clause for a one-line message: its type
  and first line, without TensorStore's closing pointer ("See full
  TensorStore details: <bound method ...>", which names nothing), cut at a
  word. The command's --verbose prints the whole error."""
  text = (str(e).strip().splitlines() or [""])[0]
  text = text.split(" See full TensorStore details")[0].rstrip(". ")
  if len(text) > limit:
    text = text[:limit].rsplit(" ", 1)[0] + " ..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__
