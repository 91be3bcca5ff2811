"""`python -m bitnet_jax.hf import --hf_dir=DIR --workdir=RUN`: a local
Hugging Face BitNet model directory (config.json, safetensors weights packed
or bf16, tokenizer.json) as a bitnet_jax run directory (hf/importer.py)."""
from __future__ import annotations

from absl import flags

from bitnet_jax import cli
from bitnet_jax.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "A local Hugging Face BitNet directory.")
flags.DEFINE_string("workdir", None, "The run directory to write (new).")
flags.DEFINE_enum("to_variant", "b1.58", ["b1.58", "v2"],
                  "v2: convert to BitNet v2 keeping the float function (W_o, "
                  "W_down rotated by the Hadamard along their input axis).")
flags.DEFINE_integer("seq_len", 0, "Context of the imported run (0: the "
                     "model's max_position_embeddings).")


def main(argv) -> None:
  if len(argv) != 2 or argv[1] != "import":
    raise InputError("usage: python -m bitnet_jax.hf import --hf_dir=DIR "
                     "--workdir=RUN")
  cli.require("hf_dir", "workdir")
  from bitnet_jax import rundir
  rundir.check_output(FLAGS.workdir, "--workdir")  # a new run, never over one
  from bitnet_jax.hf import importer
  info = importer.import_checkpoint(FLAGS.hf_dir, FLAGS.workdir, FLAGS.seq_len,
                                    FLAGS.to_variant)
  print(f"imported {info['params']:,} parameters ({info['form']} weights, as "
        f"{info['variant']}) "
        f"and a {info['tokenizer_tokens']}-token tokenizer into {FLAGS.workdir}")


if __name__ == "__main__":
  cli.run(main)
