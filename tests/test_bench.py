"""The bench's timing core measures known costs; every section runs and
reports finite, positive ratios (the bench itself asserts no speed)."""

import numpy as np
import pytest

from bitnet_jax import bench


@pytest.mark.parametrize("section", [
    "hadamard", "quant", pytest.param("train", marks=pytest.mark.slow)])
# ("decode": bench.bench_decode(small) runs in tests/test_gpu_measure.py)
def test_bench_section_produces_rows(section):
  rows = bench.SECTIONS[section](rounds=1, small=True)
  if isinstance(rows, tuple):
    rows = rows[0]
  assert rows
  for _, _, value, ratio in rows:
    assert np.isfinite(value) and value > 0 and np.isfinite(ratio) and ratio > 0


def test_interleaved_timing_measures_known_costs():
  """On a fake clock, thunks that cost 10 and 30 ms per timed call (and 1 s
  at their warm-up call, which must not count): medians exactly 0.01 and
  0.03, each thunk timed by its own calls (round-robin)."""
  now = [0.0]
  calls = {"fast": 0, "slow": 0}

  def costs(name, seconds):
    def fn():
      calls[name] += 1
      now[0] += 1.0 if calls[name] == 1 else seconds + 1e-3 * calls[name]
    return fn
  t = bench.time_interleaved({"fast": costs("fast", 0.01),
                              "slow": costs("slow", 0.03)}, rounds=3,
                             clock=lambda: now[0])
  assert calls == {"fast": 4, "slow": 4}  # one warm-up call + 3 rounds each
  # the median of calls 2..4 is call 3's cost: base + 3 ms
  assert t["fast"] == pytest.approx(0.013) and t["slow"] == pytest.approx(0.033)
