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
  # every program cached (the suite's 0.5 s threshold made the set depend
  # on how loaded the machine was: an eval step at 0.4 s in one run, 0.6 s
  # in the next)
  env = subprocess_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
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
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    procs.append(subprocess.Popen(
        cli(tmp_path / "run", corpus_file, "--config.train.compile_cache_dir=",
            "--config.train.eval_batches=0"),  # no eval step to compile
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


@pytest.mark.slow
def test_two_slices_cross_dcn_only_with_gradients():
  """--dry_run --topology=v5p:2x2x1 --num_slices=2: the slices join along
  data (mesh data 2 x fsdp 4); weights are gathered within a slice, and
  what crosses DCN is the gradient all-reduce (and the embedding gradient's
  gather of its activations, XLA's choice for the sparse update)."""
  pytest.importorskip("libtpu")
  from bitnet_jax.scale import dry_run, fit_table
  config = fit_table.load_config("400m")   # its layout and remat, made small
  config.model.update(num_layers=2, d_model=256, d_ff=512, num_heads=4,
                      num_kv_heads=0, vocab_size=1024, seq_len=128)
  config.data.batch_size = 16
  devices, _ = dry_run.topology_devices("v5p:2x2x1", 2)
  assert len({d.slice_index for d in devices}) == 2
  config.mesh.dcn_data = 2
  setup, compiled, _ = dry_run.compile_step(config, devices)
  assert dict(setup.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  from bitnet_jax.scale import hlo_text
  slice_of = [d.slice_index for d in setup.mesh.devices.flat]
  assert slice_of == [0] * 4 + [1] * 4  # data (slices) outermost
  transfers = hlo_text.dcn_transfers(compiled.as_text())
  reduces = [t for t in transfers if t[0] == "ALL_REDUCE"]
  others = [t for t in transfers if t[0] != "ALL_REDUCE"]
  assert len(reduces) >= 8  # every layer kernel's gradient, the head's, ...
  # no weight crosses DCN: the one other transfer is activation-shaped
  # ([rows, seq_len, d_model], the embedding gradient's inputs)
  assert len(others) <= 1, [t[:2] for t in others]
  assert all(",128,256]" in t[1] for t in others), [t[:2] for t in others]
  # the dry run's report says the same
  report = dry_run.summarize(setup, compiled, None, "v5p:2x2x1 x 2")
  assert report["dcn_transfers"]["ALL_REDUCE"]["sites"] == len(reduces)
  assert "across slices (DCN)" in dry_run.format_report(report)


def test_dcn_mesh_shape_and_errors():
  from bitnet_jax import defaults
  from bitnet_jax.errors import ConfigError
  from bitnet_jax.training import sharding
  from bitnet_jax.run_config import MeshConfig
  base = dict(defaults.base_config().mesh, data=1, fsdp=-1, tensor=1)
  m = MeshConfig(**dict(base, dcn_data=2))
  assert sharding.mesh_shape(m, 8) == (2, 4, 1)   # per slice: fsdp 4
  mesh = sharding.make_mesh(m, __import__("jax").devices()[:8])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(ConfigError, match="does not divide the 8 devices"):
    sharding.mesh_shape(MeshConfig(**dict(base, dcn_data=3)), 8)
  with pytest.raises(ConfigError, match="dcn_data must be >= 1"):
    MeshConfig(**dict(base, dcn_data=0))


def two_processes(workdir, corpus_file, port, stop_step=30, extra=()):
  """Start the small run as a 2-process job on this machine (no held-out
  evaluation: the training losses are what the test compares)."""
  procs = []
  for rank in range(2):
    env = subprocess_env()
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    args = [f"--config.{k}={v}" for k, v in dict(SMALL, **{
        "data.paths": corpus_file, "train.stop_step": stop_step,
        "train.ckpt_every": 100, "train.preemption_check_every": 4,
        "train.eval_batches": 0}).items()]
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "bitnet_jax.train", "--config=configs/tiny.py",
         f"--workdir={workdir}", "--distributed=on",
         f"--coordinator_address=localhost:{port}", "--num_processes=2",
         f"--process_id={rank}", *args, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
  return procs


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path,
                                                            corpus_file):
  import json
  import random
  import re
  import signal
  port = random.randint(21000, 39000)
  procs = two_processes(tmp_path / "run", corpus_file, port)
  # SIGTERM to process 1 only, once it is training
  log1 = []
  for line in procs[1].stdout:
    log1.append(line)
    if re.search(r"step [3-9]/30", line):
      procs[1].send_signal(signal.SIGTERM)
      break
  log1 += procs[1].stdout.readlines()
  log0 = procs[0].communicate(timeout=600)[0]
  procs[1].wait(timeout=600)
  logs = [log0, "".join(log1)]
  saved = []
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
    m = re.search(r"preempted: saved step (\d+)", log)
    assert m, log[-3000:]
    saved.append(int(m.group(1)))
  assert saved[0] == saved[1] and saved[0] % 4 == 0 and saved[0] < 30
  assert "another process was signalled" in logs[0]
  # resumed, the run continues exactly as an uninterrupted one
  for workdir, p in ((tmp_path / "run", port + 1), (tmp_path / "whole", port + 2)):
    procs = two_processes(workdir, corpus_file, p)
    outs = [q.communicate(timeout=600)[0] for q in procs]
    assert all(q.returncode == 0 for q in procs), outs[0][-3000:]

  def losses(workdir):
    out = {}
    for line in open(workdir / "metrics.jsonl"):
      rec = json.loads(line)
      if "loss" in rec:
        out[rec["step"]] = rec["loss"]
    return out
  resumed, whole = losses(tmp_path / "run"), losses(tmp_path / "whole")
  assert sorted(resumed) == sorted(whole) == list(range(1, 31))
  assert resumed == whole


def wandb_history(path: str) -> dict[int, dict]:
  """{step: scalars} of an offline W&B run file: its log format (32 KiB
  blocks of crc32 / length / type framed chunks after a 7-byte header)
  holding wandb_internal_pb2.Record messages, read here without W&B."""
  import json
  import struct
  from wandb.proto import wandb_internal_pb2
  data = open(path, "rb").read()
  pos, block, buf, out = 7, 32768, b"", {}
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind == 0:
      break
    buf = chunk if kind in (1, 2) else buf + chunk
    if kind in (1, 4):
      rec = wandb_internal_pb2.Record()
      rec.ParseFromString(buf)
      if rec.WhichOneof("record_type") == "history":
        row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
               for i in rec.history.item}
        if "_step" in row:
          out[int(row["_step"])] = row
  return out


@pytest.mark.slow
def test_wandb_offline_holds_the_metrics_and_resumes_the_same_run(
    tmp_path, corpus_file, monkeypatch):
  pytest.importorskip("wandb")
  import json
  from bitnet_jax.training import trainer
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  for stop in (3, 5):  # the second call resumes the run
    trainer.train(small_run_config(corpus_file, **{
        "train.stop_step": stop, "train.ckpt_every": 3,
        "train.wandb_project": "bitnet_jax_test"}), str(tmp_path))
  run_id = (tmp_path / "wandb_run_id").read_text().strip()
  runs = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
  assert len(runs) == 2 and all(r.endswith(run_id) for r in runs)
  logged = {}
  for r in runs:
    logged.update(wandb_history(glob.glob(os.path.join(r, "run-*.wandb"))[0]))
  jsonl = {rec["step"]: rec for rec in map(json.loads, open(
      tmp_path / "metrics.jsonl")) if "loss" in rec}
  assert sorted(logged) == sorted(jsonl) == [1, 2, 3, 4, 5]
  for step, rec in jsonl.items():
    assert logged[step]["loss"] == pytest.approx(rec["loss"], rel=1e-12)
    assert logged[step]["lr"] == pytest.approx(rec["lr"], rel=1e-12)
