"""Operating a run: the persistent compilation cache and profiles."""
import glob
import os
import subprocess
import sys

import pytest

from conftest import SMALL, small_run_config, subprocess_env


def cli(workdir, corpus_file, *extra):
  args = [f"--config.{k}={v}" for k, v in
          dict(SMALL, **{"data.paths": corpus_file,
                         "train.stop_step": 2}).items()]
  return [sys.executable, "-m", "bitnet_jax.train", "--config=configs/tiny.py",
          f"--workdir={workdir}", *args, *extra]


@pytest.mark.slow
def test_a_restart_loads_its_steps_from_the_compilation_cache(tmp_path,
                                                              corpus_file):
  cache = tmp_path / "xla"
  env = subprocess_env()
  for i in range(2):
    out = subprocess.run(cli(tmp_path / f"run{i}", corpus_file,
                             f"--config.train.compile_cache_dir={cache}"),
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    entries = sorted(os.listdir(cache))
    if i == 0:
      first = entries
      assert any("train_step" in e for e in first), first
  assert entries == first  # the second process compiled nothing new
  off = tmp_path / "off"
  out = subprocess.run(cli(tmp_path / "run_off", corpus_file,
                           "--config.train.compile_cache_dir="),
                       capture_output=True, text=True,
                       env=dict(env, XDG_CACHE_HOME=str(off)))
  assert out.returncode == 0 and not off.exists()


def test_profile_window_writes_a_trace(tmp_path, corpus_file):
  from bitnet_jax.training import trainer
  config = small_run_config(corpus_file, **{
      "train.stop_step": 4, "train.profile_start": 1, "train.profile_steps": 2,
      "train.compile_cache_dir": ""})
  trainer.train(config, str(tmp_path))
  traces = glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" /
                         "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000
