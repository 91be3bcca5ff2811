"""BitNet v2 1.3B (Table 8 shapes, Table 9 schedule), 8-bit activations.

The 95% of the paper's recipe trained at 8 bits: the run stops at the a4
switch step (train.stop_step) so configs/bitnet_v2_1p3b_a4.py can continue it
with 4-bit activations, reusing the optimizer state.

Run (every host of a TPU slice or GPU node runs the same command; see launch/):
  python -m bitnet_jax.train --config=configs/bitnet_v2_1p3b.py --workdir=gs://BUCKET/v2_1p3b_a8 \
      --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.tokenizer=gs://BUCKET/llama.model
Override example:  --config.opt.lr=8e-4 --config.mesh.tensor=4
Documented for a v5p:4x4x4 cube or a v5e:16x16 pod (mesh: fsdp over all
chips, one microbatch, full remat; docs/scale.md "Which slice for which config").
Check it fits first (compiles the real step for the slice on any host with
libtpu installed, allocates nothing; reports memory, FLOPs, collectives, MFU):
  python -m bitnet_jax.train --config=configs/bitnet_v2_1p3b.py --dry_run --topology=v5p:4x4x4
Baselines at this size: --config.model.variant=b1.58 (BitNet b1.58) or a4.8.
Expected (paper, Table 1, 100B RedPajama tokens): C4 validation PPL 11.14.
"""
from bitnet_jax import defaults


def get_config():
  config = defaults.paper_config("1p3b", act_bits=8)
  config.train.stop_fraction = 1.0 - defaults.PAPER_A4_FRACTION  # the a4 switch
  return config
