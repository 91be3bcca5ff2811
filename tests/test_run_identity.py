"""A run directory keeps its identity: a restart or an init_from that would
change what the saved weights compute is refused with one line before
anything is written; other changes are allowed, logged and kept."""
import hashlib
import json
import os
import shutil

import pytest

from bitnet_jax import defaults, rundir, run_identity
from bitnet_jax.errors import ConfigError


def digest(workdir):
  """Hash of every file of a run directory (paths and bytes)."""
  h = hashlib.sha256()
  for folder, _, files in sorted(os.walk(workdir)):
    for name in sorted(files):
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, workdir).encode())
      h.update(open(path, "rb").read())
  return h.hexdigest()


def test_restart_refuses_an_identity_change_and_lists_the_rest():
  saved, new = defaults.tiny_config(), defaults.tiny_config()
  saved.model.variant = "b1.58"
  with pytest.raises(ConfigError, match=r"model.variant is 'v2', but the run "
                     r"in RUN was trained with 'b1.58'.*--config.model.variant"
                     r"=b1.58"):
    run_identity.check_restart(saved, new, "RUN")
  saved.model.variant = "v2"
  new.opt.lr = 1e-3
  new.train.stop_step = 7
  changes = run_identity.check_restart(saved, new, "RUN")
  assert [c[0] for c in changes] == ["opt.lr", "train.stop_step"]
  assert changes[0][2] == 1e-3
  for field, value in (("quant.act_bits", 4), ("quant.hadamard", "none"),
                       ("model.d_model", 64), ("quant.kv_bits", 4),
                       ("model.activation", "relu2")):
    changed = defaults.tiny_config()
    group, key = field.split(".")
    changed[group][key] = value
    with pytest.raises(ConfigError, match=field):
      run_identity.check_restart(defaults.tiny_config(), changed, "RUN")


def test_init_from_keeps_the_variant_but_may_change_the_bits():
  a8, a4 = defaults.tiny_config(), defaults.tiny_config(act_bits=4)
  run_identity.check_init_from(a8, a4, "A8")       # the paper's a8 -> a4
  b158 = defaults.tiny_config()
  b158.model.variant = "b1.58"
  with pytest.raises(ConfigError, match=r"init_from=B: that run has "
                     r"model.variant='b1.58'.*to_variant=v2"):
    run_identity.check_init_from(b158, a4, "B")
  a4.init_from_any_variant = True
  run_identity.check_init_from(b158, a4, "B")
  run_identity.check_init_from(None, a4, "B")      # no config.json: shapes only
  # v2 without a Hadamard is b1.58 (the Table 5 ablation continues it), and
  # a centred v2 may continue an uncentred one (zero offsets are added)
  ablation = defaults.tiny_config(act_bits=4)
  ablation.quant.hadamard = "none"
  run_identity.check_init_from(b158, ablation, "B")
  centred = defaults.tiny_config(act_bits=4)
  centred.quant.mean_centre = True
  run_identity.check_init_from(a8, centred, "A8")


@pytest.mark.slow
def test_a_run_keeps_its_identity(tmp_path, b158_run, corpus_file):
  """On a copy of a trained b1.58 run: rerunning it as v2 (the default)
  stops with one line and changes no file; init_from it as a v2 a4 run
  stops the same way; a changed learning rate resumes, is logged in
  metrics.jsonl and kept in config_history.jsonl."""
  from bitnet_jax.training import trainer
  from conftest import small_run_config
  run = str(tmp_path / "b158")
  shutil.copytree(b158_run, run)
  before = digest(run)
  with pytest.raises(ConfigError, match="model.variant"):
    trainer.train(small_run_config(corpus_file, **{"train.stop_step": 12}), run)
  assert digest(run) == before
  a4 = small_run_config(corpus_file, **{"quant.act_bits": 4,
                                        "train.stop_step": 12})
  a4.init_from = run
  with pytest.raises(ConfigError, match="init_from="):
    trainer.train(a4, str(tmp_path / "a4"))
  assert not os.path.exists(tmp_path / "a4" / "checkpoints")
  trainer.train(small_run_config(corpus_file, **{
      "model.variant": "b1.58", "train.stop_step": 12, "opt.lr": 2e-3}), run)
  rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
  change = [r for r in rows if "config_change" in r]
  assert len(change) == 1 and change[0]["step"] == 10
  assert change[0]["config_change"]["opt.lr"]["new"] == 2e-3
  history = [json.loads(l) for l in open(os.path.join(
      run, rundir.CONFIG_HISTORY))]
  assert set(history[0]["changes"]) == {"opt.lr", "train.stop_step"}
  assert json.load(open(os.path.join(run, "config.json")))["opt"]["lr"] == 2e-3
