"""The run-directory contract: the layout a trained run has on disk, the
config round trip, clear errors, and one module that names the files."""
import ast
import os

import pytest

from bitnet_jax import rundir
from bitnet_jax.inference import pretrained
from bitnet_jax.run_config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_trained_run_has_the_documented_layout(trained_run):
  names = set(os.listdir(trained_run))
  assert {rundir.CONFIG, rundir.TOKENIZER, rundir.CHECKPOINTS, rundir.METRICS,
          rundir.LOG, rundir.TENSORBOARD, rundir.SUMMARY} <= names
  assert rundir.LOCK not in names  # released when the trainer ended
  run = rundir.RunDir(trained_run)
  assert run.read_summary()["final_step"] == 24
  assert sorted(p.name for p in run.checkpoints.iterdir()) == ["10", "20", "24"]
  # what train wrote is what every reader gets back
  pre = pretrained.load(trained_run)
  assert pre.run == RunConfig.from_config(run.read_config())
  assert pre.step == 24 and pre.tokenizer.vocab_size == pre.run.model.vocab_size


def test_config_round_trip_and_errors(tmp_path):
  from bitnet_jax import defaults
  run = rundir.RunDir(tmp_path / "new" / "run")
  run.prepare()
  assert not (run / rundir.CONFIG).exists() and run.read_summary() is None
  with pytest.raises(FileNotFoundError, match="not a bitnet_jax run directory"):
    run.read_config()
  config = defaults.tiny_config()
  run.write_config(config)
  # JSON has no tuples: the round trip is equal as JSON
  assert run.read_config().to_json() == config.to_json_best_effort()
  assert run.tokenizer_path(config.data) == run.own_tokenizer
  config.data.tokenizer = "/elsewhere/sp.model"
  assert str(run.tokenizer_path(config.data)) == "/elsewhere/sp.model"
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(rundir.NotWritable, match="is not writable"):
    rundir.RunDir(blocker / "sub").prepare()


LAYOUT = (rundir.CONFIG, rundir.TOKENIZER, rundir.CHECKPOINTS, rundir.METRICS,
          rundir.LOG, rundir.LOCK)


def test_an_older_config_keeps_the_meaning_it_was_trained_with(tmp_path):
  """Runs written before quant.weight_scale existed used one absmean per
  fused kernel; their config must not silently switch to per-projection."""
  import json
  from bitnet_jax import defaults
  from bitnet_jax.model_config import ModelConfig
  old = defaults.base_config().to_dict()
  del old["quant"]["weight_scale"]
  old["quant"]["ptq_rotation"] = ""
  (tmp_path / rundir.CONFIG).write_text(json.dumps(old))
  cfg = ModelConfig.from_config(rundir.RunDir(str(tmp_path)).read_config())
  assert cfg.weight_scale == "tensor" and cfg.ptq_rotation == "none"
  fresh = defaults.base_config()
  rundir.RunDir(str(tmp_path)).write_config(fresh)
  again = rundir.RunDir(str(tmp_path)).read_config()
  assert ModelConfig.from_config(again).weight_scale == "projection"


def test_an_older_schema_reads_as_a_run_config(tmp_path):
  """The one migration: a config.json from before train.stop_fraction,
  train.spike_factor and mesh.dcn_data existed reads as a RunConfig, with
  the meaning those runs had (no spike guard; today's defaults for the
  others), and nothing else in the code needs a default for them."""
  import json
  from bitnet_jax import defaults
  old = defaults.tiny_config().to_dict()
  for group, field in (("train", "stop_fraction"), ("train", "spike_factor"),
                       ("train", "profile_start"), ("mesh", "dcn_data")):
    del old[group][field]
  del old["init_from_any_variant"]
  (tmp_path / rundir.CONFIG).write_text(json.dumps(old))
  run = RunConfig.from_config(rundir.RunDir(str(tmp_path)).read_config())
  assert run.train.spike_factor == 0.0          # the guard did not exist
  assert run.train.stop_fraction == 1.0 and run.stop_step == 600
  assert run.mesh.dcn_data == -1 and run.train.profile_start == -1
  assert run.init_from_any_variant is False
  assert run.mesh.rules == defaults.base_config().mesh.rules  # tuples again


def test_only_rundir_spells_the_layout():
  """Every other module takes the run's file names from rundir, so the layout
  changes in one place (docstrings and config defaults may mention them)."""
  offenders = []
  for folder, _, files in os.walk(os.path.join(ROOT, "bitnet_jax")):
    for name in files:
      path = os.path.join(folder, name)
      if not name.endswith(".py") or name == "rundir.py":
        continue
      tree = ast.parse(open(path).read())
      docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                    if isinstance(node, (ast.Module, ast.FunctionDef,
                                         ast.ClassDef)) and node.body and
                    isinstance(node.body[0], ast.Expr)}
      for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and node.value in LAYOUT and
            id(node) not in docstrings):
          offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
  allowed = {"bitnet_jax/defaults.py",   # a config default, not a run file
             "bitnet_jax/hf/layout.py"}  # the Hugging Face directory's layout
  assert [o for o in offenders if o.split(":")[0] not in allowed] == []
