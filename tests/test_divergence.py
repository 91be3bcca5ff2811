"""Divergence, not only NaN: a finite loss spike stops the run naming the
last step saved before it, and train.restore_step resumes a chosen earlier
step, setting the newer ones aside (renamed, never deleted)."""
import json
import os

import pytest

from bitnet_jax.errors import Diverged
from bitnet_jax.training import metrics


def test_spike_guard_rule():
  guard = metrics.SpikeGuard(3.0, 50)
  guard.check(1, 9.0, None, "D")
  with pytest.raises(Diverged, match=r"update 2: .*no step was saved"):
    guard.check(2, 30.0, None, "D")      # one update can explode
  guard = metrics.SpikeGuard(3.0, 50)
  for step, loss in enumerate([9.0, 10.0, 8.0], 1):
    guard.check(step, loss, None, "D")
  guard.check(4, 26.0, 2, "D")             # 26 < 3 x median 9: a bump
  with pytest.raises(Diverged, match=r"update 5: loss 40 is 4\.2x the median "
                     r"9\.5 of the last 4 updates .*train.spike_factor=3.*"
                     r"restore_step=4"):
    guard.check(5, 40.0, 4, "D")
  off = metrics.SpikeGuard(0.0, 50)
  for step, loss in enumerate([1.0, 1.0, 1.0, 1e9], 1):
    off.check(step, loss, None, "D")


@pytest.mark.slow
def test_restore_step_sets_newer_steps_aside(tmp_path, corpus_file):
  from bitnet_jax.training import trainer
  from conftest import small_run_config
  run = str(tmp_path / "run")
  base = {"train.ckpt_every": 2, "train.keep_ckpts": 0}
  trainer.train(small_run_config(corpus_file, **base, **{
      "train.stop_step": 8}), run)
  ckpts = os.path.join(run, "checkpoints")
  summary = trainer.train(small_run_config(corpus_file, **base, **{
      "train.stop_step": 8, "train.restore_step": 4}), run)
  assert summary["start_step"] == 4 and summary["final_step"] == 8
  names = set(os.listdir(ckpts))
  assert {"6.after-restore-4", "8.after-restore-4"} <= names  # kept
  assert {"2", "4", "6", "8"} <= names                         # retrained
  again = trainer.train(small_run_config(corpus_file, **base, **{
      "train.stop_step": 10, "train.restore_step": 4}), run)
  assert again["start_step"] == 8  # done once: the same flag resumes the latest
  # restoring the latest step sets nothing aside, and is marked done too
  trainer.train(small_run_config(corpus_file, **base, **{
      "train.stop_step": 10, "train.restore_step": 10}), run)
  after = trainer.train(small_run_config(corpus_file, **base, **{
      "train.stop_step": 12, "train.restore_step": 10}), run)
  assert after["start_step"] == 10
  final = trainer.train(small_run_config(corpus_file, **base, **{
      "train.stop_step": 14, "train.restore_step": 10}), run)
  assert final["start_step"] == 12 and "12" in os.listdir(ckpts)
  with pytest.raises(Exception, match="restore_step=3: no such step"):
    trainer.train(small_run_config(corpus_file, **base, **{
        "train.stop_step": 12, "train.restore_step": 3}), run)


@pytest.mark.slow
def test_a_diverging_run_stops_before_saving_the_spike(tmp_path, corpus_file):
  from bitnet_jax.training import trainer
  from conftest import small_run_config
  run = str(tmp_path / "run")
  config = small_run_config(corpus_file, **{
      "train.stop_step": 30, "train.ckpt_every": 1, "train.log_every": 1,
      "opt.lr": 30.0,
      "opt.warmup_steps": 0, "opt.grad_clip": 0.0})
  with pytest.raises(Diverged) as info:
    trainer.train(config, run)
  text = str(info.value)
  assert "restore_step=" in text or "no step was saved" in text
  rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))
          if '"loss"' in l]
  saved = sorted(int(n) for n in os.listdir(os.path.join(run, "checkpoints"))
                 if n.isdigit())
  assert "update 2: loss" in text and "restore_step=1" in text
  assert saved == [1]  # the spike (update 2) was never saved
  assert rows[0]["step"] == 1 and rows[0]["loss"] < 10
