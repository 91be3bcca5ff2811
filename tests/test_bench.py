"""The bench runs and reports finite, positive ratios (it asserts no speed)."""
import numpy as np

from bitnet_jax import bench


def test_bench_sections_produce_rows():
  for section in ("hadamard", "quant"):
    rows = bench.SECTIONS[section](rounds=1, small=True)
    assert rows
    for _, _, ms, ratio in rows:
      assert np.isfinite(ms) and ms > 0 and np.isfinite(ratio) and ratio > 0
