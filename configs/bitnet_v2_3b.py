"""BitNet v2 3B (Table 8 shapes, Table 9 schedule), 8-bit activations.

The 95% of the paper's recipe trained at 8 bits: the run stops at the a4
switch step (train.stop_step) so configs/bitnet_v2_3b_a4.py can continue it
with 4-bit activations, reusing the optimizer state.

Run (every host of a TPU slice or GPU node runs the same command; see launch/):
  python -m bitnet_jax.train --config=configs/bitnet_v2_3b.py --workdir=gs://BUCKET/v2_3b_a8 \
      --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.tokenizer=gs://BUCKET/llama.model
Override example:  --config.opt.lr=8e-4 --config.mesh.tensor=4
Check it fits first (compiles from abstract shapes, allocates nothing):
  python -m bitnet_jax.train --config=configs/bitnet_v2_3b.py --workdir=/tmp/dry --dry_run
Baselines at this size: --config.model.variant=b1.58 (BitNet b1.58) or a4.8.
Expected (paper, Table 1, 100B RedPajama tokens): C4 validation PPL 9.72.
"""
from bitnet_jax import defaults


def get_config():
  config = defaults.paper_config("3b", act_bits=8)
  config.train.stop_step = defaults.a4_start_step(config.train.num_steps)
  return config
