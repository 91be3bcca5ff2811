"""The bench's timing core measures known costs; every section runs and
reports finite, positive ratios (the bench itself asserts no speed)."""
import time

import numpy as np
import pytest

from bitnet_jax import bench


@pytest.mark.parametrize("section", [
    "hadamard", "quant", pytest.param("train", marks=pytest.mark.slow),
    pytest.param("decode", marks=pytest.mark.slow)])
def test_bench_section_produces_rows(section):
  rows = bench.SECTIONS[section](rounds=1, small=True)
  if isinstance(rows, tuple):
    rows = rows[0]
  assert rows
  for _, _, value, ratio in rows:
    assert np.isfinite(value) and value > 0 and np.isfinite(ratio) and ratio > 0


def test_interleaved_timing_measures_known_costs():
  """Medians of thunks that sleep 10 ms and 30 ms: each near its cost, the
  ratio near 3 (a timer that counted the warm-up call, or one thunk's time
  for another's, fails this)."""
  calls = {"fast": 0, "slow": 0}

  def sleeper(name, seconds):
    def fn():
      calls[name] += 1
      time.sleep(seconds)
    return fn
  t = bench.time_interleaved({"fast": sleeper("fast", 0.01),
                              "slow": sleeper("slow", 0.03)}, rounds=3)
  assert calls == {"fast": 4, "slow": 4}  # one warm-up call + 3 rounds each
  assert 0.01 <= t["fast"] < 0.02 and 0.03 <= t["slow"] < 0.045
  # sleep overshoots by ~0.1-1.5 ms on a busy host: 31.3 / 10.2 ms = 3.07 seen
  assert 1.8 < t["slow"] / t["fast"] < 3.5
