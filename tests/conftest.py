"""Test setup: 8 host CPU devices, set before jax is imported anywhere."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402  (must come after the environment is set)

assert jax.device_count() == 8, (
    f"tests expect 8 forced host devices, got {jax.devices()}; was jax imported "
    "before tests/conftest.py ran?")
