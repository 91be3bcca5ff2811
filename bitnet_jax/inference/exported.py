"""Exported inference models: ternary codes packed from the latent weights,
the safetensors file and its loader (the command is bitnet_jax/export.py).

See the command's docstring for usage.
"""
from __future__ import annotations

import dataclasses
import json

from etils import epath
import jax
import numpy as np

from bitnet_jax import packing, policy
from bitnet_jax import quant, rundir, sites, storage
from bitnet_jax.progress import Progress
from bitnet_jax.errors import ConfigError, InputError, MissingInput
from bitnet_jax.model import ModelConfig, param_shapes
from bitnet_jax.rotations import rotate_input_axis

WEIGHTS_FILE = "model.safetensors"
FLOAT_DTYPES = {"bfloat16": jax.numpy.bfloat16, "float32": np.float32}


def _is_kernel(keys) -> bool:
  """A quantized projection's latent kernel."""
  found = sites.locate(keys)
  return found is not None and found.rest == (sites.KERNEL,)


def ternary_tensor(kernel, rotate: bool, block: int, layered: bool,
                   groups=None):
  """(codes int8, scale f32) of one kernel, per layer when stacked by scan;
  with `groups` (quant.ScaleGroups) one scale per projection: [segments]."""
  def one(w):
    if rotate:
      w = rotate_input_axis(w, block)
    return quant.ternary_codes(w, groups)
  codes, scale = (jax.vmap(one) if layered else one)(jax.numpy.asarray(kernel))
  return np.asarray(codes, np.int8), np.asarray(scale, np.float32)


def inference_params(params, cfg: ModelConfig, weights: str = "packed",
                     float_dtype: str = "bfloat16"):
  """Latent training params -> the param tree of `cfg.replace(weights=...)`."""
  if cfg.variant == "fp":
    raise ConfigError("the fp baseline has no ternary weights to export")
  dtype = FLOAT_DTYPES[float_dtype]
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  progress = Progress(len(leaves), "tensors", "ternarizing")
  for path, leaf in leaves:
    progress.advance()
    keys = tuple(p.key for p in path)
    target = out
    for k in keys[:-2]:
      target = target.setdefault(k, {})
    layered = keys[0] == "layers"
    found = sites.locate(keys)
    if found and found.rest == (sites.KERNEL,):
      rule = policy.linear(cfg, found.site.name)
      rotate = rule.rotation == "weight_and_activation"
      codes, scale = ternary_tensor(leaf, rotate, cfg.hadamard_block_size,
                                    layered, rule.scale_groups)
      layer = target.setdefault(keys[-2], {})
      layer["scale"] = scale
      if weights == "packed":
        shape = codes.shape[1:] if layered else codes.shape
        layer["packed"] = (np.stack([packing.pack_ternary(c) for c in codes])
                           if layered else packing.pack_ternary(codes))
        assert layer["packed"].shape[-1] == packing.packed_ternary_size(shape)
      else:
        layer["codes"] = codes
    else:
      target.setdefault(keys[-2], {})[keys[-1]] = np.asarray(leaf).astype(dtype)
  return out


def flatten(tree) -> dict:
  """{"a/b/c": leaf} of a nested param dict."""
  return {"/".join(p.key for p in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[str, np.ndarray]):
  tree: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def size_report(latent_params, exported) -> dict:
  linear = sum(int(np.prod(l.shape)) for p, l in
               jax.tree_util.tree_flatten_with_path(latent_params)[0]
               if _is_kernel(sites.path_keys(p)))
  flat = flatten(exported)
  packed = 0
  for name, value in flat.items():
    found = sites.locate(name.split("/"))
    if found and found.rest in (("packed",), ("codes",), ("scale",)):
      packed += value.nbytes
  other = sum(v.nbytes for v in flat.values()) - packed
  return {"linear_weights": linear, "linear_bytes": packed,
          "linear_bytes_bf16": 2 * linear,
          "linear_ratio_to_bf16": packed / (2 * linear),
          "other_bytes": other, "total_bytes": packed + other}


def export(pre, out_dir: str, weights: str = "packed",
           float_dtype: str = "bfloat16") -> dict:
  exported = inference_params(pre.params, pre.model_cfg, weights, float_dtype)
  run = rundir.RunDir(out_dir)  # config.json and tokenizer.model as a run's
  run.prepare()
  model = dataclasses.asdict(pre.model_cfg.replace(weights=weights))
  flat = flatten(exported)
  # safetensors has no bfloat16 in numpy: store its bits as uint16 and say so
  dtypes = {k: str(v.dtype) for k, v in flat.items()}
  stored = {k: (v.view(np.uint16) if v.dtype == jax.numpy.bfloat16 else v)
            for k, v in flat.items()}
  nbytes = storage.save_safetensors(
      stored, run.path / WEIGHTS_FILE,
      metadata={"model": json.dumps(model), "dtypes": json.dumps(dtypes),
                "format": "bitnet_jax/1"})
  run.write_config(pre.run.to_config())
  pre.tokenizer.save(run.path / pre.tokenizer.filename)
  report = size_report(pre.params, exported)
  report.update(file_bytes=nbytes, weights=weights,
                float_dtype=float_dtype, step=pre.step, source=str(pre.workdir))
  (run.path / "export.json").write_text(json.dumps(report, indent=2))
  return report


def load_weights(model_dir: str):
  """(ModelConfig, params) of an exported model; clear errors for a missing,
  truncated or mismatched file."""
  from safetensors import SafetensorError
  path = epath.Path(model_dir) / WEIGHTS_FILE
  if not path.exists():
    raise MissingInput(f"{model_dir} has no {WEIGHTS_FILE}: not an "
                            "exported model (python -m bitnet_jax.export)")
  try:
    flat, meta = storage.load_safetensors(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise InputError(f"{path} is truncated or corrupt: {e}") from e
  if meta.get("format") != "bitnet_jax/1":
    raise InputError(f"{path} was not written by bitnet_jax.export")
  cfg = ModelConfig(**json.loads(meta["model"]))
  dtypes = json.loads(meta["dtypes"])
  flat = {k: (v.view(jax.numpy.bfloat16) if dtypes.get(k) == "bfloat16" else v)
          for k, v in flat.items()}
  params = unflatten(flat)
  expected = flatten(param_shapes(cfg))
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if missing or extra:
    raise InputError(f"{path} does not match its model config: missing "
                     f"{missing[:5]}, unexpected {extra[:5]}")
  for k, want in expected.items():
    if flat[k].shape != want.shape:
      raise InputError(f"{path}: {k} has shape {flat[k].shape}, the config "
                       f"needs {want.shape}")
  return cfg, params
