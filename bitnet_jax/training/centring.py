"""Calibration of the mean-centred H-BitLinear offsets (quant.mean_centre).

A centred H-BitLinear (layers.BitLinear with `centre`) quantizes H x - mu and
adds Q_w(W) mu back. mu is the token-shared offset of the rotated input H x,
one vector per W_o / W_down (per layer). The optimizer cannot learn it: under
the straight-through estimator the loss does not depend on mu (its gradient
is zero), so it is a parameter set here and frozen (stop-gradient in the
layer, no weight decay: it is not a weight matrix).

When: the first time a run trains with 4-bit activations while every offset
is still zero (an 8-bit parent continued by `init_from`, or the step where
`quant.a4_start_step` switches). mu is the mean of H x over every token of
the next CALIBRATION_BATCHES training batches, computed by the 8-bit model
(the function the a8 stage learned); the data stream is rewound afterwards,
so the run sees the same batches as without centring. At 8 bits the offsets
stay zero and the layer computes exactly what plain H-BitLinear does.

An 8-bit parent saved without offsets is continued by restoring it as the
uncentred model's state and adding zero offsets (and zero optimizer moments
for them): `add_missing_offsets`.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.checkpoint import CheckpointError
from bitnet_jax.data.batch import Batch

OFFSET = "offset"          # the BitLinear parameter
MEAN = "rotated_mean"      # what a centred BitLinear sows: mean of H x
CALIBRATION_BATCHES = 4


def _keys(path) -> tuple:
  return tuple(k for k in (getattr(p, "key", getattr(p, "idx", None))
                           for p in path) if isinstance(k, str))


def offset_leaves(params) -> dict[tuple, jax.Array]:
  """{param path: offset} of every centred layer."""
  return {_keys(p): leaf for p, leaf in
          jax.tree_util.tree_flatten_with_path(params)[0]
          if _keys(p)[-1:] == (OFFSET,)}


def needs_calibration(params) -> bool:
  """Offsets exist and all are zero (one host read, once per run)."""
  leaves = offset_leaves(params)
  return bool(leaves) and not any(
      bool(jnp.any(v != 0)) for v in leaves.values())


def make_means(model):
  """jitted (params, batch) -> {offset path: mean of H x over the tokens}."""

  def means(params, batch: Batch):
    _, state = model.apply({"params": params}, batch.inputs,
                           batch.input_positions, batch.input_segments,
                           mutable=["intermediates"])
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(
        state["intermediates"])[0]:
      keys = _keys(path)
      if keys[-1:] == (MEAN,):
        out[keys[:-1] + (OFFSET,)] = x
    return out

  return jax.jit(means)


def set_offsets(params, offsets: dict[tuple, np.ndarray]):
  """params with each offset replaced (same dtype and sharding)."""
  def put(path, leaf):
    new = offsets.get(_keys(path))
    if new is None:
      return leaf
    return jax.device_put(jnp.asarray(new, leaf.dtype), leaf.sharding)
  return jax.tree_util.tree_map_with_path(put, params)


def calibrate(params, model_a8, batches) -> tuple:
  """(params with calibrated offsets, {path: max |mu|}) from the batches
  (global arrays) run through the 8-bit model."""
  means = make_means(model_a8)
  total, n = None, 0
  for batch in batches:
    m = jax.device_get(means(params, batch))
    total = m if total is None else {k: total[k] + m[k] for k in total}
    n += 1
  if not n:
    raise ValueError("calibration needs at least one batch")
  offsets = {k: np.asarray(v, np.float64) / n for k, v in total.items()}
  missing = set(offset_leaves(params)) - set(offsets)
  if missing:
    raise ValueError(f"no rotated-input mean sown for {sorted(missing)[0]}")
  return set_offsets(params, offsets), {
      "/".join(k[:-1]): float(np.max(np.abs(v))) for k, v in offsets.items()}


def add_missing_offsets(state, abstract):
  """The state `abstract` describes, from `state` restored without offsets:
  every leaf of `abstract` missing from `state` must be an offset or one of
  its optimizer moments, and starts at zero."""
  have = {jax.tree_util.keystr(p): leaf for p, leaf in
          jax.tree_util.tree_flatten_with_path(state)[0]}
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  leaves = []
  for path, a in flat:
    name = jax.tree_util.keystr(path)
    leaf = have.pop(name, None)
    if leaf is None:
      if f"'{OFFSET}'" not in name:
        raise CheckpointError(f"the restored state lacks {name}, which is not "
                              "a mean-centring offset")
      leaf = jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding)
    leaves.append(leaf)
  if have:
    raise CheckpointError(f"the restored state has {next(iter(have))}, which "
                          "this config does not")
  return jax.tree_util.tree_unflatten(treedef, leaves)


def log_offsets(step: int, sizes: dict[str, float]) -> None:
  worst = max(sizes, key=sizes.get)
  logging.info("step %d: calibrated %d mean-centring offsets on %d batches "
               "(largest |mu| %.3g at %s)", step, len(sizes),
               CALIBRATION_BATCHES, sizes[worst], worst)
