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
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the test run's own cache
  out = subprocess.run(cli(tmp_path / "run_off", corpus_file,
                           "--config.train.compile_cache_dir="),
                       capture_output=True, text=True,
                       env=dict(env, XDG_CACHE_HOME=str(off)))
  assert out.returncode == 0 and not off.exists()


def test_profile_window_writes_a_trace(tmp_path, corpus_file):
  from bitnet_jax.training import trainer
  config = small_run_config(corpus_file, **{
      "train.stop_step": 4, "train.profile_start": 1, "train.profile_steps": 2})
  trainer.train(config, str(tmp_path))
  traces = glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" /
                         "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000


@pytest.mark.slow
def test_slurm_environment_forms_the_job(tmp_path, corpus_file):
  """Two processes with the variables SLURM sets for `srun` (no coordinator
  flags): --distributed=auto forms one 2-process job through JAX's SLURM
  detection, and it trains."""
  import random
  job = str(random.randint(1000, 900000))
  procs = []
  for rank in range(2):
    env = subprocess_env(SLURM_JOB_ID=job,
                         SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                         SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                         SLURM_STEP_NUM_NODES="1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    procs.append(subprocess.Popen(
        cli(tmp_path / "run", corpus_file, "--config.train.compile_cache_dir="),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for rank, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, log[-3000:]
    assert f"jax.distributed: process {rank} of 2" in log, log[-2000:]
    assert "devices: 4 x" in log or rank, log[-2000:]
  assert os.path.exists(tmp_path / "run" / "checkpoints" / "2")


def test_slurm_script_does_not_mask_devices():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = open(os.path.join(root, "launch", "slurm.sbatch")).read()
  commands = [l for l in script.splitlines() if not l.lstrip().startswith("#")]
  assert not any("CUDA_VISIBLE_DEVICES" in l for l in commands)
  assert any(l.startswith("srun") and "--distributed=on" in l for l in commands)
