"""What a run directory is: the config fields that define the function its
checkpoints compute, checked whenever a run restarts or continues another.

A restart of a workdir that holds checkpoints may change how the run goes on
(learning rate, steps, logging, data paths, the mesh): each change is allowed,
logged, and kept in `config_history.jsonl` (rundir.CONFIG_HISTORY; one row
per restart that changed something: the step, and each field's old and new
value). It may not change
what the saved weights mean: the identity fields below. A change of one of
those stops the run with one line naming the field, both values and what to
do, before anything in the workdir is written.

`init_from` (continuing another run into a new workdir, e.g. the a8 -> a4
switch, which changes the activation bits by design) must keep the variant
and its form (GLU, Hadamard, mean-centring, weight scales, the shapes and
the tokenizer): continuing a BitNet b1.58 run as v2 is a conversion the
project defines only as `python -m bitnet_jax.hf import --to_variant=v2`; an
experiment that wants it anyway sets `init_from_any_variant=True`.
"""
from __future__ import annotations

import json
import time

from etils import epath

from bitnet_jax import rundir, storage
from bitnet_jax.errors import ConfigError

# What the saved weights mean on a restart of the same workdir.
IDENTITY = (
    "model.variant", "model.activation", "model.vocab_size", "model.d_model",
    "model.d_ff", "model.num_heads", "model.num_kv_heads", "model.num_layers",
    "model.tie_embeddings", "model.rope_theta", "model.norm_eps",
    "quant.act_bits", "quant.a4_start_step", "quant.hadamard",
    "quant.hadamard_block_size", "quant.q_bits", "quant.kv_bits",
    "quant.mean_centre", "quant.weight_scale", "quant.topk_ratio_o",
    "quant.topk_ratio_down", "quant.ptq_rotation", "data.tokenizer",
)
# What init_from keeps: the identity without the activation bits and their
# schedule, which the a8 -> a4 continuation changes by design, and without
# the shapes, which checkpoint.check_init_from names parameter by parameter.
SHAPES = ("model.vocab_size", "model.d_model", "model.d_ff", "model.num_heads",
          "model.num_kv_heads", "model.num_layers")
# Mean-centring too: the trainer gives an uncentred run's weights the zero
# offsets of a centred one (training/centring.py).
INIT_FROM_IDENTITY = tuple(f for f in IDENTITY if f not in (
    "quant.act_bits", "quant.a4_start_step", "data.tokenizer",
    "quant.mean_centre") + SHAPES)


def _value(config, dotted: str):
  """A field as it acts: v2 without a Hadamard is BitNet b1.58 (the Table 5
  ablation continues the b1.58 run), and only v2 reads quant.hadamard."""
  if dotted in ("model.variant", "quant.hadamard"):
    variant, hadamard = _get(config, "model.variant"), _get(config,
                                                           "quant.hadamard")
    if variant == "v2" and hadamard == "none":
      variant = "b1.58"
    if variant is not None and variant != "v2":
      hadamard = "none"
    return variant if dotted == "model.variant" else hadamard
  return _get(config, dotted)


def _get(config, dotted: str):
  node = config
  for key in dotted.split("."):
    try:
      node = node[key]
    except (KeyError, TypeError):
      return None
  return node


def _flat(config, prefix: str = "") -> dict:
  out = {}
  for key in config.keys():
    value = config[key]
    name = f"{prefix}{key}"
    if hasattr(value, "keys"):
      out.update(_flat(value, name + "."))
    else:
      out[name] = value.tolist() if hasattr(value, "tolist") else (
          list(value) if isinstance(value, tuple) else value)
  return out


def _same(a, b) -> bool:
  return json.dumps(a, sort_keys=True, default=str) == json.dumps(
      b, sort_keys=True, default=str)


def identity_changes(saved, config, fields=IDENTITY) -> list[tuple]:
  """(field, saved value, new value) of each identity field that differs; a
  field the saved config does not have (an older run) is not compared, and
  variant / Hadamard count as the model they make (_value)."""
  form = ("model.variant", "quant.hadamard")
  form_differs = any(not _same(_value(saved, f), _value(config, f))
                     for f in form)
  out = []
  for f in fields:
    old, new = _get(saved, f), _get(config, f)
    if old is None or _same(old, new) or (f in form and not form_differs):
      continue
    out.append((f, old, new))
  return out


def check_restart(saved, config, workdir: str) -> list[tuple]:
  """Refuse a restart that changes what the run is; return the other
  changed fields (field, old, new)."""
  changed = identity_changes(saved, config)
  if changed:
    field, old, new = changed[0]
    raise ConfigError(
        f"{field} is {new!r}, but the run in {workdir} was trained with "
        f"{old!r}: its checkpoints compute that model. Rerun with "
        f"--config.{field}={old}, or train the new setting in a new --workdir"
        + (f" ({len(changed) - 1} more field(s) differ)" if len(changed) > 1
           else ""))
  old, new = _flat(saved), _flat(config)
  return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if k != "init_from" and not _same(old.get(k), new.get(k))]


def check_init_from(source_config, config, source: str) -> None:
  """Refuse init_from a run whose variant or form differs (unless the
  config says init_from_any_variant, for an experiment)."""
  if source_config is None or config.init_from_any_variant:
    return
  changed = identity_changes(source_config, config, INIT_FROM_IDENTITY)
  if changed:
    field, old, new = changed[0]
    raise ConfigError(
        f"init_from={source}: that run has {field}={old!r}, this config "
        f"{new!r}; continuing it would train another model on its weights. "
        "Set the same value, convert it with `python -m bitnet_jax.hf import "
        "--to_variant=v2` (b1.58 -> v2), or set "
        "--config.init_from_any_variant=True for an experiment")


def source_config(init_from: str):
  """The config.json of the run an init_from path (workdir, its
  checkpoints/ or one step directory) belongs to; None if it has none."""
  p = epath.Path(init_from)
  for candidate in (p, p.parent, p.parent.parent):
    if (candidate / rundir.CONFIG).exists():
      return rundir.RunDir(candidate).read_config()
  return None


def record_changes(workdir_path, step: int, changes: list[tuple]) -> None:
  """Append one row for this restart to config_history.jsonl."""
  if not changes:
    return
  row = {"step": int(step), "time": time.time(),
         "changes": {k: {"old": old, "new": new} for k, old, new in changes}}
  path = workdir_path / rundir.CONFIG_HISTORY
  text = path.read_text() if path.exists() else ""
  storage.write_atomic(path, text + json.dumps(row, default=str) + "\n")
