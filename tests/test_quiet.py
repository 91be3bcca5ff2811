"""Quiet by default: on a host without a TPU an installed libtpu does not
probe for one (no noise on any command), the console gets a one-screen
start of a run, and the full config goes to config.json and train.log."""
import os
import subprocess
import sys

import pytest

from bitnet_jax import cli
from conftest import ROOT, subprocess_env

LIBTPU_NOISE = ("host bounds", "worker hostname", "TPU_WORKER_HOSTNAMES",
                "libtpu_lockfile")


def test_local_platforms_keeps_a_users_choice_and_tpu_hosts(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  cli.local_platforms()
  assert os.environ["JAX_PLATFORMS"] == "tpu"
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
  cli.local_platforms()
  assert "JAX_PLATFORMS" not in os.environ
  monkeypatch.delenv("TPU_ACCELERATOR_TYPE")
  monkeypatch.setattr(cli.glob, "glob", lambda pattern: [])
  import jax  # imported before the frame ran (export.py does): told too
  updates = []
  monkeypatch.setattr(jax.config, "update", lambda *a: updates.append(a))
  cli.local_platforms()
  assert os.environ["JAX_PLATFORMS"] == "cpu"
  assert updates == [("jax_platforms", "cpu")]


@pytest.mark.slow
def test_a_run_starts_quietly(tmp_path, corpus_file):
  env = {k: v for k, v in subprocess_env().items()  # as a user runs it (the
         if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}  # TPU tests set TPU_*
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.train", "--config=configs/tiny.py",
       f"--workdir={workdir}", f"--config.data.paths={corpus_file}",
       "--config.data.source=text", "--config.model.vocab_size=512",
       "--config.model.d_model=64", "--config.model.d_ff=128",
       "--config.model.num_layers=1", "--config.model.seq_len=32",
       "--config.train.stop_step=2", "--config.train.num_steps=100",
       "--config.train.eval_batches=1"],
      env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  console = proc.stdout + proc.stderr
  assert not [n for n in LIBTPU_NOISE if n in console], console[:2000]
  assert "config.json (all of it in train.log)" in console
  assert "mesh.rules" not in console          # no config dump
  log = (workdir / "train.log").read_text()
  assert "rules" in log and "config:" in log
