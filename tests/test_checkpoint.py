"""Orbax checkpoints: round trip, corrupted steps, init_from checks."""
import dataclasses
import logging
import os

import jax
import numpy as np
import pytest

from bitnet_jax import checkpoint as ckpt_lib
from bitnet_jax import defaults
from bitnet_jax.data import pipeline as data
from bitnet_jax.training import trainer

from test_sharding import small_config


@pytest.fixture(scope="module")
def setup():
  return trainer.build(small_config((2, 2, 2)))


def fresh_state(setup, seed=0):
  seeded = dataclasses.replace(setup, run=setup.run.replace(seed=seed))
  with setup.context():
    state, _, _ = trainer.initial_state(seeded, NoCkpt(), None)
  return state


class NoCkpt:
  def restore_latest(self, abstract, data_iter, *args):
    return None, None


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def data_iterator(documents, tok):
  cfg = defaults.base_config().data
  cfg.update(batch_size=2, prefetch=0, shuffle_rows=8)
  return iter(data.train_dataset(documents, tok, cfg, seq_len=15, seed=0))


def test_round_trip_restores_state_shardings_and_data(tmp_path, setup, documents,
                                                      small_tokenizer):
  state = fresh_state(setup)
  it = data_iterator(documents, small_tokenizer)
  for _ in range(3):
    next(it)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  ck.save(7, state, trainer.FrozenIteratorState(it))
  expected_next = next(it).tokens  # the loop moved on before the save ran
  ck.wait()
  it2 = data_iterator(documents, small_tokenizer)
  restored, step = ck.restore_latest(setup.abstract, it2)
  assert step == 7
  for a, b in zip(leaves(restored), leaves(state)):
    np.testing.assert_array_equal(a, b)
  kernel = restored.params["layers"]["attn"]["qkv"]["kernel"]
  assert kernel.sharding == setup.state_sharding.params["layers"]["attn"]["qkv"]["kernel"]
  np.testing.assert_array_equal(next(it2).tokens, expected_next)
  ck.close()


def damage(step_dir):
  """Truncate every array data file of a saved state."""
  hit = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      path = os.path.join(root, f)
      if "ocdbt" in root or f.startswith("d") or f.endswith(".data"):
        with open(path, "r+b") as fh:
          fh.truncate(max(0, os.path.getsize(path) // 3))
        hit += 1
  assert hit, "found no data files to damage"


def test_corrupted_latest_falls_back_to_previous(tmp_path, setup, caplog):
  s1, s2 = fresh_state(setup, 1), fresh_state(setup, 2)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3, async_save=False)
  ck.save(10, s1, None)
  ck.save(20, s2, None)
  ck.close()
  damage(str(tmp_path / "checkpoints" / "20"))
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  with caplog.at_level(logging.ERROR):
    restored, step = ck.restore_latest(setup.abstract)
  assert step == 10
  for a, b in zip(leaves(restored), leaves(s1)):
    np.testing.assert_array_equal(a, b)
  assert "checkpoint step 20" in caplog.text and "cannot be restored" in caplog.text
  assert (tmp_path / "checkpoints" / "20.unreadable-0").exists()
  damage(str(tmp_path / "checkpoints" / "10"))
  with pytest.raises(ckpt_lib.CheckpointError,
                     match="set aside: 10.unreadable-0, 20.unreadable-0. "
                     "Refusing to start from step 0"):
    ckpt_lib.Checkpointer(str(tmp_path)).restore_latest(setup.abstract)
  state, step = ckpt_lib.Checkpointer(str(tmp_path)).restore_latest(
      setup.abstract, allow_fresh_start=True)
  assert state is None and step is None


def test_init_from_resolution_and_shape_mismatch(tmp_path, setup):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "a8"), async_save=False)
  ck.save(5, fresh_state(setup), None)
  ck.close()
  root = tmp_path / "a8"
  assert ckpt_lib.resolve_checkpoint(str(root))[1] == 5
  assert ckpt_lib.resolve_checkpoint(str(root / "checkpoints"))[1] == 5
  assert ckpt_lib.resolve_checkpoint(str(root / "checkpoints" / "5"))[1] == 5
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    ckpt_lib.resolve_checkpoint(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt_lib.resolve_checkpoint(str(tmp_path / "nope"))
  state, step, _ = ckpt_lib.restore_init_from(str(root), setup.abstract)
  assert step == 5 and int(state.step) == 0  # the saved state's own counter
  wider = small_config((2, 2, 2))
  wider.model.d_ff = 128
  other = trainer.build(wider)
  with pytest.raises(ValueError, match=r"parameter .*ffn/down/kernel has shape "
                     r"\(2, 64, 32\) in the checkpoint but \(2, 128, 32\)"):
    ckpt_lib.restore_init_from(str(root), other.abstract)


def snapshot(directory):
  """{relative path: bytes} of every file under a directory."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, directory)] = fh.read()
  return out


def test_a_config_mismatch_refuses_and_changes_nothing(tmp_path, setup):
  """Another width, or another optimizer layout (opt.grad_clip=0 drops the
  clipping state): one line naming the problem; every step stays, byte for
  byte; the right config then resumes the latest step."""
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3, async_save=False)
  for step in (10, 20, 30):
    ck.save(step, fresh_state(setup, step), None)
  ck.close()
  before = snapshot(tmp_path / "checkpoints")
  wider = small_config((2, 2, 2))
  wider.model.d_model = 64
  no_clip = small_config((2, 2, 2))
  no_clip.opt.grad_clip = 0.0
  for config, message in ((wider, r"parameter \S+ has shape"),
                          (no_clip, "does not match this config .*opt.grad_clip")):
    other = trainer.build(config)
    with pytest.raises(ckpt_lib.CheckpointError, match=message):
      ckpt_lib.Checkpointer(str(tmp_path)).restore_latest(other.abstract)
  assert snapshot(tmp_path / "checkpoints") == before
  _, step = ckpt_lib.Checkpointer(str(tmp_path)).restore_latest(setup.abstract)
  assert step == 30


def test_a_transient_read_error_renames_nothing(tmp_path, setup, monkeypatch):
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3, async_save=False)
  ck.save(10, fresh_state(setup), None)
  ck.close()
  ck = ckpt_lib.Checkpointer(str(tmp_path))

  def unreadable(*args, **kwargs):
    raise PermissionError(13, "Permission denied", "checkpoints/10/state")
  monkeypatch.setattr(ck, "restore", unreadable)
  with pytest.raises(ckpt_lib.CheckpointError, match="nothing was changed"):
    ck.restore_latest(setup.abstract)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
