"""Numbers over seeds and the verdict rule, on hand-computed cases."""
import math

import pytest

from bitnet_jax.experiments.seeds import Stat, aggregate, pointwise, verdict


def test_stat_mean_sd_and_paired_arithmetic():
  a, b = Stat((10.0, 12.0, 14.0)), Stat((9.0, 12.0, 12.0))
  assert a.mean == 12.0 and a.sd == pytest.approx(2.0)
  assert (a - b).values == (1.0, 0.0, 2.0)
  assert (a / b).values[1] == 1.0
  assert format(a, ".2f") == "12.00 ± 2.00"
  assert format(Stat((3.0,)), ".1f") == "3.0"
  assert pointwise(min, a, b).values == (9.0, 12.0, 12.0)
  with pytest.raises(ValueError):
    a - Stat((1.0, 2.0))


def test_verdict_rule():
  # d = (1, 0, 2): mean 1, sd 1, se 1/sqrt(3) = 0.577; mean ± 2se = [-0.15, 2.15]
  d = Stat((1.0, 0.0, 2.0))
  assert verdict(d, 3.0) == "agrees"         # all of it below 3
  assert verdict(d, -0.5) == "differs"       # all of it above -0.5
  assert verdict(d, 1.0) == "inconclusive"   # 1 inside the interval
  assert verdict(d, -0.5, below=False) == "agrees"
  assert verdict(Stat((0.5,)), 3.0) == "inconclusive"  # one seed
  assert verdict(Stat((math.inf, math.nan, math.inf)), 0.1, below=False) == "agrees"
  assert verdict(Stat((math.inf, 1.0, 1.0)), 0.1) == "inconclusive"


def test_aggregate_keeps_structure():
  tree = aggregate([{"a": {"ppl": 2.0, "name": "x"}, "n": 1},
                    {"a": {"ppl": 4.0, "name": "x"}, "n": 3}])
  assert tree["a"]["ppl"].values == (2.0, 4.0) and tree["a"]["name"] == "x"
  assert tree["n"].mean == 2.0
