"""Tiny BitNet v2 (a8) that trains on a 2-core CPU in minutes, with no download.

Data: the embedded default corpus (the Python standard library's own source
files, found at run time) and a sentencepiece tokenizer trained into the
workdir. Like the paper's recipe, the 8-bit run stops at 95% of the schedule;
configs/tiny_a4.py continues it at 4-bit activations.

Run:
  python -m bitnet_jax.train --config=configs/tiny.py --workdir=/tmp/bitnet_tiny
Override example:  --config.opt.lr=3e-3 --config.model.variant=b1.58
Expected: see README "Quick start" (loss and time measured on a 2-core CPU).
"""
from bitnet_jax import defaults


def get_config():
  config = defaults.tiny_config(act_bits=8)
  config.train.stop_fraction = 1.0 - defaults.PAPER_A4_FRACTION  # the a4 switch
  return config
