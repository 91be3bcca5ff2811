"""The typed run config: built once from a ConfigDict, every rule checked
there with one line naming the field, written back to the same layout, and
the a8 -> a4 schedule derived in one place (checked against the paper's
rule: the last 5% of updates at 4 bits, counted by hand)."""
import dataclasses
import json

import pytest

from bitnet_jax import defaults
from bitnet_jax.errors import ConfigError
from bitnet_jax.run_config import RunConfig


def test_round_trip_to_the_config_layout():
  c = defaults.paper_config("7b")
  run = RunConfig.from_config(c)
  assert json.loads(run.to_config().to_json_best_effort()) == json.loads(
      c.to_json_best_effort())
  assert RunConfig.from_config(run.to_config()) == run
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.seed = 1  # frozen: nobody changes a run config under a running loop


@pytest.mark.parametrize("field,value,message", [
    ("opt.lr_shape", "step", "opt.lr_shape must be one of"),
    ("opt.warmup_steps", 400, "opt.warmup_steps 400 must be <= the stage-2 "
     "start"),
    ("data.source", "web", "data.source must be one of"),
    ("data.packing", "greedy", "data.packing must be one of"),
    ("data.worker_count", -1, "data.worker_count must be >= 0"),
    ("mesh.dcn_data", 0, "mesh.dcn_data must be >= 1 or -1"),
    ("mesh.fsdp", 0, "sizes must be positive"),
    ("train.spike_window", 2, "train.spike_window must be >= 3"),
    ("train.num_steps", 0, "train.num_steps must be > 0"),
    ("model.d_ff", 0, "model.d_ff: must be positive"),
])
def test_each_rule_names_its_field(field, value, message):
  c = defaults.tiny_config()
  group, name = field.split(".")
  c[group][name] = value
  with pytest.raises(ConfigError, match=message):
    RunConfig.from_config(c)


def test_unknown_and_missing_fields_are_refused():
  c = defaults.tiny_config()
  c.opt.learning_rate = 1.0
  with pytest.raises(ConfigError, match=r"unknown opt config fields "
                     r"\['learning_rate'\]"):
    RunConfig.from_config(c)
  c = defaults.tiny_config().to_dict()
  del c["train"]["log_every"]
  import ml_collections
  with pytest.raises(ConfigError, match=r"lacks \['log_every'\]"):
    RunConfig.from_config(ml_collections.ConfigDict(c))
  c = defaults.tiny_config()
  c.mesh.rules = (("embed", "model"),)
  with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
    RunConfig.from_config(c)


def test_the_a8_to_a4_schedule():
  """configs/bitnet_v2_7b.py stops its a8 run at 95% of 95367 updates;
  a run that switches in place (a4_start_step) trains update s at 4 bits
  iff s >= the switch, and checkpoint N holds updates 0..N-1."""
  run = RunConfig.from_config(defaults.paper_config("7b"))
  assert run.bits_used() == (8,) and run.bits_at(10**6) == 8
  c = defaults.tiny_config()  # 600 steps, the paper's 5% = the last 30
  c.quant.a4_start_step = 570
  run = RunConfig.from_config(c)
  assert run.bits_used() == (4, 8)
  assert [run.bits_at(s) for s in (0, 569, 570, 599)] == [8, 8, 4, 4]
  assert [run.trained_bits(n) for n in (0, 570, 571, 600)] == [8, 8, 4, 4]
  assert run.tokens_per_step == 16 * 128
