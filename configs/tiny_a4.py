"""Tiny BitNet v2 continued at 4-bit activations from the tiny a8 run.

Restores params, optimizer state and step from the a8 workdir and trains the
last 5% of the schedule with every quantized linear at 4-bit activations.

Run (after configs/tiny.py trained into /tmp/bitnet_tiny):
  python -m bitnet_jax.train --config=configs/tiny_a4.py --workdir=/tmp/bitnet_tiny_a4 \
      --config.init_from=/tmp/bitnet_tiny
Override example:  --config.train.log_every=5
Expected: see docs/training.md "a8 → a4 continue-training".
"""
from bitnet_jax import defaults


def get_config():
  config = defaults.tiny_config(act_bits=4)
  config.train.require_init_from = True  # --config.init_from=<a8 workdir>
  return config
