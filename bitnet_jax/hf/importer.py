"""A local Hugging Face BitNet directory -> a bitnet_jax run directory.

Reads config.json, the safetensors weights (model.safetensors or the shards
of model.safetensors.index.json; packed uint8 + weight_scale or bf16 master
weights) and tokenizer.json (or a sentencepiece tokenizer.model); writes
config.json, the tokenizer and an orbax checkpoint at step 0 whose optimizer
state is fresh (nothing to continue: `train --config.init_from=RUN` starts
the schedule at step 0 from these weights). `evaluate`, `generate`,
`analyze` and `export` read it as any run. `to_variant='v2'` turns the b1.58
checkpoint into a BitNet v2 whose float function is the same (W_o, W_down
rotated: weights.rotate_for_v2).
"""
from __future__ import annotations

import json
import logging
import os

from etils import epath
import numpy as np

from bitnet_jax import defaults, rundir, storage
from bitnet_jax.errors import InputError, MissingInput
from bitnet_jax.hf import layout, weights


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint, as numpy (bf16 widened to float32)."""
  root = epath.Path(hf_dir)
  index = root / layout.INDEX_FILE
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (root / layout.WEIGHTS_FILE).exists():
    files = [layout.WEIGHTS_FILE]
  else:
    raise MissingInput(f"{hf_dir} has no model.safetensors (nor an index of "
                       "shards)")
  missing = [f for f in files if not (root / f).exists()]
  if missing:
    raise MissingInput(f"{hf_dir}: shard {missing[0]} (listed in "
                       "model.safetensors.index.json) is missing")
  out = {}
  for name in files:
    try:
      tensors, _ = storage.load_safetensors(root / name, framework="flax")
    except Exception as e:  # safetensors raises its own error types
      raise InputError(f"{root / name} is not a safetensors "
                       f"file: {str(e).splitlines()[0][:200]}") from None
    for key, value in tensors.items():
      a = np.asarray(value) if value.dtype == np.uint8 else \
          np.asarray(value.astype("float32"))
      out[key] = a
  return out


VARIANTS = ("b1.58", "v2")


def run_config(hf_config: dict, seq_len: int = 0, variant: str = "b1.58"):
  """bitnet_jax's config of the imported model (defaults elsewhere)."""
  config = defaults.base_config()
  over = layout.model_overrides(hf_config)
  if seq_len:
    over["seq_len"] = seq_len
  over["variant"] = variant
  config.model.update(over)
  config.quant.weight_scale = "projection"
  config.data.tokenizer = ""
  return config


def import_checkpoint(hf_dir: str, workdir: str, seq_len: int = 0,
                      to_variant: str = "b1.58") -> dict:
  """Write the run directory; returns what was imported. to_variant='v2'
  converts the b1.58 checkpoint into a BitNet v2 (weights.rotate_for_v2)."""
  if to_variant not in VARIANTS:
    raise InputError(f"--to_variant must be one of {VARIANTS}, got "
                     f"{to_variant!r}")
  import jax
  from bitnet_jax.data import tokenizer as tokenizer_lib
  from bitnet_jax.model import param_shapes
  from bitnet_jax.run_config import RunConfig
  from bitnet_jax import checkpoint as ckpt_lib
  from bitnet_jax.training import optimizer, train_step
  root = epath.Path(hf_dir)
  path = root / layout.CONFIG_FILE
  if not path.exists():
    raise MissingInput(f"{hf_dir} has no config.json: not a Hugging Face "
                       "model directory")
  hf_config = json.loads(path.read_text())
  try:
    config = run_config(hf_config, seq_len, to_variant)
  except (KeyError, ValueError) as e:
    raise InputError(f"{path}: {e}") from None
  typed = RunConfig.from_config(config)  # v2: checks Hadamard sizes
  model_cfg = typed.model
  tok_path = root / rundir.TOKENIZER_JSON
  if not tok_path.exists():  # a sentencepiece model (our exports)
    tok_path = root / rundir.TOKENIZER
  if not tok_path.exists():
    raise MissingInput(f"{hf_dir} has no {rundir.TOKENIZER_JSON} (nor a "
                       f"sentencepiece {rundir.TOKENIZER})")
  tokenizer = tokenizer_lib.load(tok_path)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise InputError(f"{tok_path} has {tokenizer.vocab_size} tokens, the "
                     f"model {model_cfg.vocab_size}")
  tensors = read_tensors(hf_dir)
  form = "packed" if any(v.dtype == np.uint8 for v in tensors.values()) else \
      "master"
  try:
    params = weights.to_params(tensors, hf_config)
  except KeyError as e:
    raise InputError(f"{hf_dir}: {e.args[0]}") from None
  except ValueError as e:  # a tensor whose shape the config does not allow
    raise InputError(f"{hf_dir}: a weight does not fit config.json ({e})"
                     ) from None
  try:
    ckpt_lib.check_param_shapes(params, param_shapes(model_cfg),
                       f"{hf_dir} vs its config.json")
  except ValueError as e:
    raise InputError(str(e)) from None
  if to_variant == "v2":
    params = weights.rotate_for_v2(params, model_cfg.hadamard_block_size)
  params = jax.tree.map(jax.numpy.asarray, params)
  tx = optimizer.make_optimizer(typed.opt, typed.train.num_steps)
  state = train_step.TrainState(step=jax.numpy.zeros((), jax.numpy.int32),
                                params=params, opt_state=tx.init(params))
  run = rundir.RunDir(workdir)
  run.prepare()
  if ckpt_lib.has_checkpoint(workdir):
    raise InputError(f"{workdir} already holds checkpoints; import into a new "
                     "directory")
  run.write_config(config)
  tokenizer.save(run.path / tokenizer.filename)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=1, async_save=False)
  ckpt.save(0, state, None, force=True)
  ckpt.close()
  info = {"source": hf_dir if storage.is_remote(hf_dir) else
          os.path.abspath(hf_dir), "form": form,
          "variant": to_variant,
          "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
          "tokenizer_tokens": tokenizer.vocab_size}
  (run.path / "import.json").write_text(json.dumps(info, indent=2))
  logging.info("imported %s (%s weights) into %s", hf_dir, form, workdir)
  return info
