"""Numbers over seeds, and the rule that judges a finding against their noise.

A study runs every model at several seeds (init and data order). `Stat`
holds one number per seed (formatted as mean ± sd); differences and ratios
of two Stats are paired, seed by seed. `verdict` judges a finding stated as
"the paired quantity d is below (or above) a threshold": with n seeds, mean
d̄ and standard error se = sd / sqrt(n), the finding

  agrees        when d̄ + 2 se is on the claimed side of the threshold
                (d̄ - 2 se for "above"),
  differs       when d̄ ∓ 2 se is on the other side,
  inconclusive  otherwise, and always with a single seed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

RULE = ("agrees when the mean paired difference ± 2 standard errors lies on "
        "the claimed side of its threshold, differs when it lies on the "
        "other side, inconclusive otherwise (and with one seed)")


@dataclasses.dataclass(frozen=True)
class Stat:
  values: tuple[float, ...]

  @property
  def n(self) -> int:
    return len(self.values)

  @property
  def mean(self) -> float:
    return sum(self.values) / self.n

  @property
  def sd(self) -> float:
    if self.n < 2:
      return 0.0
    m = self.mean
    return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

  @property
  def finite(self) -> bool:
    return all(math.isfinite(v) for v in self.values)

  def _pair(self, other, op):
    theirs = other.values if isinstance(other, Stat) else (other,) * self.n
    if len(theirs) != self.n:
      raise ValueError(f"cannot pair {self.n} seeds with {len(theirs)}")
    return Stat(tuple(op(a, b) for a, b in zip(self.values, theirs)))

  def __sub__(self, other):
    return self._pair(other, lambda a, b: a - b)

  def __truediv__(self, other):
    return self._pair(other, lambda a, b: a / b if b else math.inf)

  def __format__(self, spec: str) -> str:
    if self.n < 2:
      return format(self.mean, spec)
    return f"{format(self.mean, spec)} ± {format(self.sd, spec.lstrip('+'))}"


def pointwise(fn, *stats: Stat) -> Stat:
  """fn applied seed by seed (e.g. the best of several baselines)."""
  return Stat(tuple(fn(*vals) for vals in zip(*(s.values for s in stats))))


def aggregate(replicas: Sequence[Any]) -> Any:
  """One tree with a Stat wherever the replicas hold numbers (same keys)."""
  first = replicas[0]
  if isinstance(first, dict):
    return {k: aggregate([r[k] for r in replicas]) for k in first}
  if isinstance(first, (int, float)) and not isinstance(first, bool):
    return Stat(tuple(float(r) if r is not None else math.nan
                      for r in replicas))
  return first


def as_json(tree: Any) -> Any:
  if isinstance(tree, Stat):
    return {"mean": tree.mean, "sd": tree.sd, "values": list(tree.values)}
  if isinstance(tree, dict):
    return {k: as_json(v) for k, v in tree.items()}
  return tree


def verdict(d: Stat, threshold: float, below: bool = True) -> str:
  """'agrees' / 'differs' / 'inconclusive' for the claim d < threshold
  (below=True) or d > threshold; a non-finite d (a diverged run) counts as
  +inf."""
  values = [v if math.isfinite(v) else math.inf for v in d.values]
  if d.n < 2:
    return "inconclusive"
  if any(math.isinf(v) for v in values):
    sure = all(math.isinf(v) for v in values)
    if not sure:
      return "inconclusive"
    return "differs" if below else "agrees"
  se = Stat(tuple(values)).sd / math.sqrt(d.n)
  m = sum(values) / d.n
  lo, hi = m - 2 * se, m + 2 * se
  if below:
    return "agrees" if hi < threshold else "differs" if lo > threshold else \
        "inconclusive"
  return "agrees" if lo > threshold else "differs" if hi < threshold else \
      "inconclusive"
