"""The mesh axes and the tracing-time partitioning helpers the model calls:
how an activation's features and a kernel are split under the mesh and the
logical-axis rules in context (`jax.set_mesh`, `nn.logical_axis_rules`).
Ground floor: the layers use it; the mesh itself is built by
training/sharding.py."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def feature_split(logical_axis: str | None, batch: int):
  """For an activation [batch, ..., features] whose feature axis is named
  `logical_axis`: (mesh axis splitting the features, its size, the mesh
  axes splitting the batch) under the rules and mesh in context; None when
  the features are unsplit, the batch does not divide, or there is no mesh
  (`jax.set_mesh`) or rules in context."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if logical_axis is None or not rules or mesh.empty:
    return None
  axis = nn.logical_to_mesh_axes((logical_axis,), rules)[0]
  if not (isinstance(axis, str) and mesh.shape.get(axis, 1) > 1):
    return None
  batch_axes = nn.logical_to_mesh_axes(("activation_batch",), rules)[0]
  names = (batch_axes if isinstance(batch_axes, tuple) else
           (batch_axes,) if batch_axes else ())
  if axis in names or batch % math.prod(mesh.shape[a] for a in names):
    return None
  return axis, mesh.shape[axis], batch_axes


def token_axes(batch: int):
  """The mesh axes splitting an activation's leading (batch) axis under the
  rules and mesh in context: a tuple of names; None when nothing splits it
  (no mesh or rules in context, or axes of size 1); False when the batch
  does not divide them (a per-shard kernel cannot run)."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return None
  axes = nn.logical_to_mesh_axes(("activation_batch",), rules)[0]
  names = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ())
                if mesh.shape.get(a, 1) > 1)
  if not names:
    return None
  return names if batch % math.prod(mesh.shape[a] for a in names) == 0 \
      else False


def matmul_layouts(logical_axes) -> tuple[P, P] | None:
  """(stored, gathered) layouts of a kernel with these logical axes: its
  parameter sharding, and where a matmul uses it (without the batch axes
  data and fsdp: gathered for FSDP, still split for tensor parallelism);
  None when no mesh or rules are in context."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return None
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)

  def keep(axis):
    names = axis if isinstance(axis, tuple) else (axis,) if axis else ()
    kept = tuple(a for a in names if a not in BATCH_AXES)
    return kept[0] if len(kept) == 1 else (kept or None)
  return spec, P(*(keep(a) for a in spec))
