"""What decides a run's floating-point bits besides its config and seed.

The same command reproduces bit for bit (tests/test_train.py checks two fresh
processes), but only on the same float path: another XLA flag (e.g. the test
suite's `--xla_backend_optimization_level=0`), device count, backend or
library version changes the rounding from the first step (~1e-6 relative),
and training amplifies it (~1e-4 after 40 steps of the tiny config; percents
of perplexity after the study's 800). summary.json records this fingerprint
so that two runs can be compared for what they are.
"""
from __future__ import annotations

import os

import jax

# Environment variables that change compiled numerics or device layout.
NUMERIC_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_DEFAULT_MATMUL_PRECISION",
               "JAX_ENABLE_X64", "LIBTPU_INIT_ARGS")


def fingerprint() -> dict:
  import jaxlib
  import flax
  import optax
  device = jax.devices()[0]
  return {
      "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "flax": flax.__version__, "optax": optax.__version__,
      "backend": jax.default_backend(), "device_kind": device.device_kind,
      "devices": jax.device_count(), "processes": jax.process_count(),
      "env": {k: os.environ[k] for k in NUMERIC_ENV if os.environ.get(k)},
  }
