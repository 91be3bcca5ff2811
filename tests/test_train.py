"""End-to-end training: resume after SIGKILL, a8 -> a4, errors, dry run, multi-process."""
import json
import os
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from bitnet_jax import checkpoint as ckpt_lib
from bitnet_jax.training import optimizer
from bitnet_jax.training import trainer
from bitnet_jax.model import ModelConfig, Transformer
from bitnet_jax.run_config import RunConfig

from conftest import SMALL, small_run_config, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = subprocess_env()

def small_config(corpus_file, **overrides):
  return small_run_config(corpus_file, **overrides)


def cli_args(corpus_file, **overrides):
  settings = dict(SMALL, **{"data.paths": corpus_file})
  settings.update(overrides)
  return [f"--config.{k}={v}" for k, v in settings.items()]


def train_cli(workdir, *args, config="configs/tiny.py"):
  return [sys.executable, "-m", "bitnet_jax.train", f"--config={config}",
          f"--workdir={workdir}", *args]


def losses(workdir):
  """step -> loss, the last record of each step winning (restarts repeat some)."""
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec
  return out


@pytest.mark.slow
def test_sigkill_resume_reproduces_the_uninterrupted_run(tmp_path, corpus_file):
  full, cut = tmp_path / "full", tmp_path / "cut"
  subprocess.run(train_cli(full, *cli_args(corpus_file)), env=ENV, cwd=ROOT,
                 check=True, capture_output=True, timeout=600)
  proc = subprocess.Popen(train_cli(cut, *cli_args(corpus_file)), env=ENV,
                          cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (cut / "checkpoints" / "10").exists():
    assert proc.poll() is None and time.time() < deadline, "no checkpoint at 10"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (cut / "summary.json").exists()
  resumed = subprocess.run(train_cli(cut, *cli_args(corpus_file)), env=ENV,
                           cwd=ROOT, check=True, capture_output=True, text=True,
                           timeout=600)
  assert "resumed step" in resumed.stderr
  # the killed trainer's lease was stale (its pid is gone): taken over
  assert "taking over the stale lease" in resumed.stderr
  marks = [json.loads(l) for l in open(cut / "metrics.jsonl")
           if "resumed_from" in l]
  assert [(m["step"], m["resumed_from"], m["origin"]) for m in marks] == [
      (marks[0]["resumed_from"], marks[0]["resumed_from"], "resumed")]
  assert marks[0]["resumed_from"] >= 10
  a, b = losses(full), losses(cut)
  assert sorted(b) == list(range(1, 31))
  for step in range(11, 31):
    assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6), step
  assert a[30]["loss"] < a[1]["loss"]


DETERMINISTIC_FIELDS = ("loss", "grad_norm", "lr", "wd", "tokens", "eval_loss")


@pytest.mark.slow
def test_the_same_command_reproduces_bit_for_bit(tmp_path, corpus_file):
  """Two fresh processes, the same command and seed (each trains its own
  tokenizer): every logged loss, gradient norm and schedule value is equal."""
  runs = []
  for name in ("first", "second"):
    workdir = tmp_path / name
    subprocess.run(train_cli(workdir, *cli_args(corpus_file,
                                                 **{"train.num_steps": 20})),
                   env=ENV, cwd=ROOT, check=True, capture_output=True,
                   timeout=600)
    assert (workdir / "tokenizer.model").read_bytes() == (
        (tmp_path / "first" / "tokenizer.model").read_bytes())
    records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    runs.append([{k: r[k] for k in ("step",) + DETERMINISTIC_FIELDS if k in r}
                 for r in records if "loss" in r or "eval_loss" in r])
  assert len(runs[0]) >= 20
  assert runs[0] == runs[1]
  # what decides the bits besides config and seed is on record
  env = json.load(open(tmp_path / "first" / "summary.json"))["environment"]
  assert env["env"]["XLA_FLAGS"] == ENV["XLA_FLAGS"] and env["devices"] >= 1


def saved_state(workdir, step):
  """The raw arrays of a saved state, read without any target structure."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)


@pytest.mark.slow
def test_a8_to_a4_init_from(tmp_path, corpus_file):
  a8_dir, a4_dir = str(tmp_path / "a8"), str(tmp_path / "a4")
  a8 = small_config(corpus_file, **{"train.stop_step": 20})
  trainer.train(a8, a8_dir)
  a4 = small_config(corpus_file, **{"quant.act_bits": 4,
                                    "train.require_init_from": True})
  a4.init_from = a8_dir
  setup = trainer.build(a4)
  # Moments right after the restore equal the saved ones, bit for bit.
  state, step, _ = ckpt_lib.restore_init_from(a8_dir, setup.abstract)
  raw = saved_state(a8_dir, 20)
  assert step == 20 and int(state.step) == 20
  adam = state.opt_state[1].inner_state[0]
  raw_adam = raw["opt_state"][1]["inner_state"][0]
  for name in ("mu", "nu"):
    got = jax.tree.leaves(getattr(adam, name))
    want = jax.tree.leaves(raw_adam[name])
    assert len(got) == len(want) > 10
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # The continued run: same schedule, steps 21..30, 4-bit activations.
  summary = trainer.train(a4, a4_dir)
  assert summary["origin"] == "init_from" and summary["start_step"] == 20
  recs = losses(a4_dir)
  assert sorted(recs) == list(range(21, 31))
  sched = optimizer.lr_schedule(RunConfig.from_config(a4).opt, 30)
  for s, rec in recs.items():
    assert rec["act_bits"] == 4
    assert rec["lr"] == pytest.approx(float(sched(s - 1)), rel=1e-6, abs=1e-9)
  with open(os.path.join(a4_dir, "tokenizer.model"), "rb") as f1, open(
      os.path.join(a8_dir, "tokenizer.model"), "rb") as f2:
    assert f1.read() == f2.read(), "the a4 run reuses the a8 tokenizer"
  # The activation bits really changed: <= 16 levels per token at 4 bits.
  params = nn.meta.unbox(saved_state(a4_dir, 30)["params"])
  tokens = np.arange(64, dtype=np.int32).reshape(2, 32) % 320
  for bits, most in ((4, 16), (8, 256)):
    cfg = ModelConfig.from_config(a4).replace(act_bits=bits, scan_layers=True)
    _, inter = Transformer(cfg).apply({"params": params}, tokens,
                                      mutable=["intermediates"])
    counts = [len(np.unique(np.asarray(row)))
              for path, leaf in jax.tree_util.tree_flatten_with_path(inter)[0]
              if "quantized_input" in jax.tree_util.keystr(path)
              for row in np.asarray(leaf).reshape(-1, np.asarray(leaf).shape[-1])]
    assert counts and max(counts) <= most
    if bits == 8:
      assert max(counts) > 16


@pytest.mark.slow
def test_a4_switch_in_one_run(tmp_path, corpus_file):
  config = small_config(corpus_file, **{"quant.a4_start_step": 12,
                                        "train.stop_step": 16})
  summary = trainer.train(config, str(tmp_path))
  recs = losses(str(tmp_path))
  assert [recs[s]["act_bits"] for s in range(10, 17)] == [8, 8, 8, 4, 4, 4, 4]
  # evaluation, analysis and export load it with the bits each step used
  from bitnet_jax.inference import pretrained
  assert pretrained.load(str(tmp_path)).model_cfg.act_bits == 4
  assert pretrained.load(str(tmp_path), step=10).model_cfg.act_bits == 8
  assert pretrained.load(str(tmp_path), step=16, act_bits=8).model_cfg.act_bits == 8
  assert np.isfinite(summary["final_eval_loss"])


class _PoisonState(NamedTuple):
  count: jax.Array


def poison_updates_at(update: int) -> optax.GradientTransformation:
  """Turns the `update`-th parameter update (1-based) into NaN: the loss and
  gradient of that step stay finite, the parameters it writes do not."""
  def init(params):
    del params
    return _PoisonState(jnp.zeros([], jnp.int32))

  def apply(updates, state, params=None):
    del params
    bad = state.count + 1 == update
    updates = jax.tree.map(lambda u: jnp.where(bad, jnp.nan, u), updates)
    return updates, _PoisonState(state.count + 1)
  return optax.GradientTransformation(init, apply)


@pytest.mark.slow
def test_a_non_finite_update_is_never_saved(tmp_path, corpus_file, monkeypatch):
  """Update 5 writes NaN parameters from a finite loss and gradient (what a
  blow-up looks like one step before the loss shows it). With a checkpoint
  every step, update 5 is not saved; the error names it and the last good
  step (4) by update count, as metrics.jsonl does; step 4 is finite and the
  run resumes from it."""
  workdir = str(tmp_path)
  real = optimizer.make_optimizer

  def patched(poison_at):
    return lambda opt_cfg, steps: optax.chain(real(opt_cfg, steps),
                                              poison_updates_at(poison_at))
  config = small_config(corpus_file, **{"train.ckpt_every": 1,
                                        "train.keep_ckpts": 0})
  monkeypatch.setattr(optimizer, "make_optimizer", patched(5))
  with pytest.raises(FloatingPointError,
                     match=r"update 5 is not finite \(loss [0-9.]+, gradient "
                     r"norm [0-9.]+, parameters not finite\); stopping without "
                     r"saving it \(the last good checkpoint is step 4 "):
    trainer.train(config, workdir)
  assert max(losses(workdir)) == 4  # nothing logged past the last good update
  monkeypatch.setattr(optimizer, "make_optimizer", patched(-1))
  setup = trainer.build(config)
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  assert ckpt.latest_step() == 4
  state = ckpt.restore(4, setup.abstract)
  ckpt.close()
  assert all(np.all(np.isfinite(np.asarray(l)))
             for l in jax.tree.leaves(state.params))
  summary = trainer.train(small_config(corpus_file, **{
      "train.ckpt_every": 1, "train.stop_step": 8}), workdir)
  assert summary["origin"] == "resumed" and summary["start_step"] == 4
  assert np.isfinite(summary["final_eval_loss"])


@pytest.mark.slow
def test_diverging_run_stops_at_the_first_non_finite_update(tmp_path,
                                                           corpus_file):
  config = small_config(corpus_file, **{
      "model.variant": "fp", "opt.lr": 1e30, "opt.lr_stage2": 1e30,
      "opt.grad_clip": 0.0, "opt.warmup_steps": 0, "train.ckpt_every": 1})
  with pytest.raises(FloatingPointError, match=r"update (\d+) is not finite .*"
                     r"the last good checkpoint is step \d+"):
    trainer.train(config, str(tmp_path))


BAD = [
    (["--config.model.no_such_key=1"], "--config.model.no_such_key=1: no such config field"),
    (["--config.model.d_model=abc"], "--config.model.d_model=abc"),
    (["--config.mesh.data=3"], "needs 3 devices"),
    (["--config.init_from=/nonexistent/run"], "init_from: /nonexistent/run does not exist"),
    (["--config.data.paths=/nonexistent/*.txt"], "matched no files"),
    (["--config=configs/nope.py"], "cannot load --config=configs/nope.py: [Errno 2]"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_clear_line(tmp_path, corpus_file, args, message):
  cmd = train_cli(tmp_path / "w", *cli_args(corpus_file), *args)
  result = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert "Compiling" not in result.stderr


@pytest.mark.slow
def test_workdir_and_continuation_errors(tmp_path, corpus_file):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  for args, message in (
      ([f"--workdir={blocker}/sub"], "is not writable"),
      (["--workdir=" + str(tmp_path / "a4")], "set --config.init_from"),
  ):
    cmd = [sys.executable, "-m", "bitnet_jax.train", "--config=configs/tiny_a4.py",
           *cli_args(corpus_file), *args]
    result = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_dry_run_cli_for_a_topology(tmp_path):
  """`--dry_run --topology=cpu:8` from a fresh process (it sets the host
  device count itself) prints the per-chip report and writes it as JSON."""
  out = tmp_path / "report.json"
  result = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.train", "--config=configs/tiny.py",
       "--dry_run", "--topology=cpu:8", f"--dry_run_json={out}"], env=ENV,
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "cpu:8 (8 x cpu)" in result.stdout and "memory per chip" in result.stdout
  report = json.loads(out.read_text())
  assert report["devices"] == 8 and report["mesh"]["data"] == 8
  assert 0.8 < report["program_flops"] / report["needed_flops"] < 1.2
  bad = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.train", "--config=configs/tiny.py",
       "--workdir=/tmp/unused", "--topology=cpu:8"], env=ENV, cwd=ROOT,
      capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--topology is for --dry_run" in bad.stderr


@pytest.mark.slow
def test_two_processes_train_and_checkpoint(tmp_path, corpus_file):
  workdir = tmp_path / "mp"
  args = cli_args(corpus_file, **{"train.stop_step": 6, "train.ckpt_every": 3})
  launcher = [os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "1", "--",
              "--config=configs/tiny.py", f"--workdir={workdir}", *args]
  env = dict(ENV, PYTHON=sys.executable)
  first = subprocess.run(launcher, env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
  assert first.returncode == 0, first.stdout[-3000:]
  assert "process 1 of 2" in first.stdout
  data_dir = workdir / "checkpoints" / "6" / "data"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
  launcher[launcher.index("--config.train.stop_step=6")] = "--config.train.stop_step=9"
  second = subprocess.run(launcher, env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
  assert second.returncode == 0, second.stdout[-3000:]
  assert "resumed step 6" in second.stdout
  assert (workdir / "checkpoints" / "9").exists()


@pytest.mark.slow
def test_tiny_config_loss_falls(tmp_path):
  """The README's main job (one CPU device), shortened to its first 60 steps,
  compiled as a user's run is (default XLA flags: its steps outweigh the
  compile). Measured: 8.18 at step 10, 5.67 and 5.56 at steps 50 and 60."""
  subprocess.run(train_cli(tmp_path, "--config.train.stop_step=60",
                           "--config.train.log_every=10"),
                 env=dict(ENV, XLA_FLAGS=""),
                 cwd=ROOT, check=True, capture_output=True, timeout=900)
  recs = losses(str(tmp_path))
  first_logged = recs[min(recs)]["loss"]
  assert max(recs[50]["loss"], recs[60]["loss"]) < 0.75 * first_logged


@pytest.mark.slow
def test_failed_init_from_takes_nothing_from_the_other_run(tmp_path, trained_run,
                                                          corpus_file):
  """A width mismatch with the init_from run is refused before its tokenizer
  is copied, so a retry with the right run cannot inherit the wrong one."""
  workdir = str(tmp_path / "a4")
  config = small_config(corpus_file, **{"model.d_model": 64})
  config.init_from = trained_run
  with pytest.raises(ValueError, match="has shape"):
    trainer.train(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "tokenizer.model"))
