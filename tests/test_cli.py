"""The command frame: a user error is one line and exit status 1; a bug keeps
its traceback."""
import subprocess
import sys

import pytest

from bitnet_jax import cli, errors

import conftest


def test_user_error_is_one_line_and_exit_1(capsys):
  def main(argv):
    raise errors.ConfigError("model.d_ff: must be positive, got 0")
  with pytest.raises(SystemExit) as stop:
    cli.guarded(main)([])
  assert stop.value.code == 1
  assert capsys.readouterr().err == "error: model.d_ff: must be positive, got 0\n"


def test_a_bug_keeps_its_traceback():
  def main(argv):
    raise ValueError("a programming error")
  with pytest.raises(ValueError, match="a programming error"):
    cli.guarded(main)([])


def test_user_errors_are_also_the_builtin_kinds():
  assert issubclass(errors.ConfigError, ValueError)
  assert issubclass(errors.MissingInput, FileNotFoundError)
  assert str(errors.MissingField("x.jsonl:3: no field 'text'")) == \
      "x.jsonl:3: no field 'text'"


def test_a_command_reports_a_missing_run_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.evaluate",
       f"--workdir={tmp_path / 'nothing'}"],
      capture_output=True, text=True, env=conftest.subprocess_env(), timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "Traceback" not in proc.stderr
