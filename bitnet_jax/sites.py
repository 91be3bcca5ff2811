"""The quantized projections of a block, named once.

Every module that finds a projection in a parameter or intermediates tree
(export, activation statistics, the PTQ baselines, the weight-decay mask)
asks this registry instead of parsing names of its own; the model names its
modules from it. A path inside a projection reads
  [<layer prefix>...] <block> <site> <leaf...>
e.g. layers/attn/qkv/kernel (scanned layers) or layer_3/ffn/down/norm/scale.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Site:
  name: str      # module name, and the quantization policy's role
  block: str     # the block submodule holding it
  title: str     # the paper's name

  @property
  def intermediate(self) -> bool:
    """Its input is an intermediate state (attention output, GLU product):
    the inputs BitNet v2 rotates and BitNet a4.8 sparsifies."""
    return self.name in ("o", "down")


QKV = Site("qkv", "attn", "W_qkv")
O = Site("o", "attn", "W_o")
UP_GATE = Site("up_gate", "ffn", "W_up,gate")
DOWN = Site("down", "ffn", "W_down")
SITES = (QKV, O, UP_GATE, DOWN)
BY_NAME = {s.name: s for s in SITES}

KERNEL = "kernel"   # a linear layer's (latent) weight matrix
HEAD = "head"       # the output head (a float Linear)


@dataclasses.dataclass(frozen=True)
class Located:
  prefix: tuple[str, ...]   # the layer's path ("layers",) or ("layer_3",)
  site: Site
  rest: tuple[str, ...]     # inside the projection: ("kernel",), ("norm", "scale")


def locate(keys: Sequence[str]) -> Located | None:
  """Where a path of string keys falls, or None outside every projection."""
  keys = tuple(keys)
  for i in range(len(keys) - 1):
    site = BY_NAME.get(keys[i + 1])
    if site is not None and keys[i] == site.block:
      return Located(keys[:i], site, keys[i + 2:])
  return None


def path_keys(path) -> tuple[str, ...]:
  """The string keys of a jax tree path (DictKey entries)."""
  return tuple(str(getattr(k, "key", k)) for k in path)


def is_weight_matrix(keys: Sequence[str]) -> bool:
  """A projection's or the head's kernel: what weight decay applies to."""
  keys = tuple(keys)
  if not keys or keys[-1] != KERNEL:
    return False
  found = locate(keys)
  return (found is not None and found.rest == (KERNEL,)) or keys[-2:] == (
      HEAD, KERNEL)
