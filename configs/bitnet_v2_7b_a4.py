"""BitNet v2 7B, 4-bit activations: the last 5% of tokens, continued from a8.

Restores params, optimizer state and step from the a8 run (init_from) and
trains the remaining steps of the same two-stage schedule with every quantized
linear layer at 4-bit activations (Sec. 2.2: the optimizer states are reused).

Run:
  python -m bitnet_jax.train --config=configs/bitnet_v2_7b_a4.py --workdir=gs://BUCKET/v2_7b_a4 \
      --config.init_from=gs://BUCKET/v2_7b_a8
Override example:  --config.opt.lr_end=1e-5
Expected (paper, Table 1): C4 validation PPL 9.24.
"""
from bitnet_jax import defaults


def get_config():
  config = defaults.paper_config("7b", act_bits=4)
  config.train.require_init_from = True  # --config.init_from=<a8 workdir>
  return config
