"""The bench runs and reports finite, positive ratios (it asserts no speed)."""
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
