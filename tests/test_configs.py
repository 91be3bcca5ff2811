"""Every file in configs/ loads, its documented override works, and it
builds a valid model; the model config is the config groups."""
import dataclasses
import glob
import importlib.util
import os
import re

import pytest

from bitnet_jax import defaults, model_config
from bitnet_jax.model import ModelConfig
from bitnet_jax.run_config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_configs():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  for size in ("400m", "1p3b", "3b", "7b"):
    assert f"bitnet_v2_{size}.py" in names and f"bitnet_v2_{size}_a4.py" in names
  assert {"tiny.py", "tiny_a4.py"} <= names


def documented_overrides(doc: str, rel: str) -> list[tuple[str, str]]:
  """The --config.a.b=v pairs of the docstring's run example."""
  example = doc.split(f"--config={rel}", 1)[1]
  return re.findall(r"--config\.([\w.]+)=(\S+)", example)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_and_its_documented_override_build_a_valid_run(path):
  module = load(path)
  doc = module.__doc__ or ""
  rel = os.path.relpath(path, ROOT)
  assert f"--config={rel}" in doc, "docstring shows the exact run command"
  config = module.get_config()
  # Same schema as the documented defaults: no stray or missing fields.
  assert set(config.keys()) == set(defaults.base_config().keys())
  for group in ("model", "quant", "opt", "data", "mesh", "train"):
    assert set(config[group].keys()) == set(defaults.base_config()[group].keys())
  ModelConfig.from_config(config)  # validates shapes and options
  RunConfig.from_config(config)
  # The documented override example names real fields and stays valid.
  overrides = documented_overrides(doc, rel)
  assert overrides, "an override example"
  for dotted, value in overrides:
    *groups, field = dotted.split(".")
    node = config
    for g in groups:
      node = node[g]
    old = node[field]  # KeyError: the example names no real field
    node[field] = (value.lower() == "true" if isinstance(old, bool)
                   else type(old)(value))
  ModelConfig.from_config(config)
  RunConfig.from_config(config)


def test_model_config_is_the_model_and_quant_groups():
  """One schema: ModelConfig's fields are the model group plus the quant
  group's model keys, with the same defaults."""
  base = defaults.base_config()
  fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
  keys = set(base.model.keys()) | (set(base.quant.keys()) -
                                   set(model_config.TRAINING_QUANT_KEYS))
  assert set(fields) == keys
  for group in (base.model, base.quant):
    for key, value in group.items():
      f = fields.get(key)
      if f is not None and f.default is not dataclasses.MISSING:
        assert f.default == value, (key, f.default, value)
  with pytest.raises(ValueError, match="unknown model/quant config fields"):
    base.model.unknown_field = 1
    ModelConfig.from_config(base)


def test_a4_configs_continue_their_a8_parent():
  for size in ("400m", "1p3b", "3b", "7b"):
    a8 = load(os.path.join(ROOT, "configs", f"bitnet_v2_{size}.py")).get_config()
    a4 = load(os.path.join(ROOT, "configs", f"bitnet_v2_{size}_a4.py")).get_config()
    assert a8.quant.act_bits == 8 and a4.quant.act_bits == 4
    assert a4.train.require_init_from
    # The a8 run stops where the paper's last 5% of tokens begins.
    assert RunConfig.from_config(a8).stop_step == round(0.95 * a8.train.num_steps)
    assert a8.model == a4.model and a8.opt == a4.opt


def test_paper_table9_values():
  expected = {"400m": (1.8e-3, 1.2e-3), "1p3b": (1.2e-3, 8e-4),
              "3b": (1.2e-3, 6.4e-4), "7b": (1e-3, 6e-4)}
  for size, (lr1, lr2) in expected.items():
    c = defaults.paper_config(size)
    assert (c.opt.lr, c.opt.lr_stage2) == (lr1, lr2)
    assert (c.opt.weight_decay, c.opt.weight_decay_stage2) == (0.1, 0.0)
    assert (c.opt.warmup_steps, c.opt.b1, c.opt.b2) == (375, 0.9, 0.95)
    assert c.model.seq_len == 2048 and c.data.batch_size * 2048 == 1 << 20


def test_the_a8_stop_follows_num_steps():
  """Overriding train.num_steps alone (as the README suggests) moves the a8
  stop with it: configs/tiny.py stops at 95% of whatever the schedule is."""
  tiny = load(os.path.join(ROOT, "configs", "tiny.py")).get_config()
  assert RunConfig.from_config(tiny).stop_step == 570
  tiny.train.num_steps = 200
  assert RunConfig.from_config(tiny).stop_step == 190
  RunConfig.from_config(tiny)


@pytest.mark.parametrize("field,value,message", [
    ("opt.lr", -1.0, "opt.lr must be > 0"),
    ("opt.b2", 1.0, "opt.b2 must be in"),
    ("train.microbatches", 0, "train.microbatches must be >= 1"),
    ("train.stop_step", 700, "train.stop_step 700 must be in"),
    ("quant.a4_start_step", 600, "quant.a4_start_step 600 is not inside the run"),
    ("data.eval_fraction", 1.0, "data.eval_fraction must be in"),
])
def test_validation_names_the_field(field, value, message):
  c = load(os.path.join(ROOT, "configs", "tiny.py")).get_config()
  group, name = field.split(".")
  c[group][name] = value
  with pytest.raises(ValueError, match=message):
    RunConfig.from_config(c)
