"""Outputs never land on a run: every command that writes a directory
refuses one that is a run, lies inside one, or holds one, before anything is
loaded or written; exported files get the umask's normal modes."""
import os
import shutil
import stat
import subprocess
import sys

import pytest

from bitnet_jax import rundir, storage
from conftest import ROOT, subprocess_env
from test_run_identity import digest


def fake_run(path):
  os.makedirs(os.path.join(path, "checkpoints", "3"))
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write("{}")
  return str(path)


def test_check_output_refuses_a_run_inside_or_holding_one(tmp_path):
  run = fake_run(tmp_path / "run")
  for out, words in ((run, "is a run directory"),
                     (os.path.join(run, "export"), "is inside"),
                     (os.path.join(run, "checkpoints", "x"), "is inside"),
                     (str(tmp_path), "holds the run directory")):
    with pytest.raises(rundir.OutputOnRun, match=words):
      rundir.check_output(out)
  rundir.check_output(str(tmp_path / "fresh"))          # fine: new
  rundir.check_output(str(tmp_path), may_hold_runs=True)  # a study's folder
  ptq = fake_run(tmp_path / "ptq")
  with pytest.raises(rundir.OutputOnRun):
    rundir.check_output(ptq, own=rundir.PTQ)
  open(os.path.join(ptq, rundir.PTQ), "w").write("{}")
  rundir.check_output(ptq, own=rundir.PTQ)  # its own earlier output


def test_saved_files_get_the_umask_mode(tmp_path):
  import numpy as np
  path = tmp_path / "w.safetensors"
  storage.save_safetensors({"a": np.zeros(3, np.float32)}, path)
  assert stat.S_IMODE(os.stat(path).st_mode) == storage.default_file_mode()


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["bitnet_jax.export", "--format=hf", "--out={run}"],
    ["bitnet_jax.export", "--out={run}/export"],
    ["bitnet_jax.analyze", "--out={run}"],
    ["bitnet_jax.ptq", "--method=quarot", "--out={run}", "--overwrite"],
])
def test_commands_refuse_to_write_on_a_run(tmp_path, b158_run, command):
  """On a copy of a trained run: one error line, not a file changed."""
  run = str(tmp_path / "run")
  shutil.copytree(b158_run, run)
  before = digest(run)
  args = [a.format(run=run) for a in command[1:]]
  workdir = ([f"--workdir={b158_run}"] if command[0] == "bitnet_jax.ptq"
             else [f"--workdir={run}"])
  proc = subprocess.run([sys.executable, "-m", command[0], *workdir, *args],
                        env=subprocess_env(), capture_output=True, text=True,
                        timeout=300, cwd=ROOT)
  assert proc.returncode != 0
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "run directory" in errors[0], proc.stderr[-800:]
  assert digest(run) == before
