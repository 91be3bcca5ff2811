"""`python -m bitnet_jax.export --workdir=RUN --out=DIR`: a packed inference model.

(`--format=hf` / `hf-bf16` write the Hugging Face BitNet layout instead, for
b1.58 runs: hf/exporter.py; `--format=gguf` one GGUF file for llama.cpp:
gguf_file/writer.py.)

The trained linear weights become 2-bit ternary codes (four per byte) with
their per-tensor absmean scales -- exactly the ternary weights the training
graph used (Eq. 1-2; for the `weight_and_activation` ablation, of the rotated
kernel). The embedding, head and norms are kept in --dtype (bfloat16 by
default). DIR gets:

  model.safetensors   tensors named by their parameter path ("layers/attn/qkv/
                      packed", ".../scale", "embed/embedding", ...); the
                      model config as JSON in the file's metadata
  config.json         the run's config (model and quant groups)
  tokenizer.model     the run's tokenizer
  export.json         the size report

Load it with `load(DIR)` (or `python -m bitnet_jax.generate --model=DIR`): the
model then runs with integer matmuls (`ModelConfig.weights`: `packed` keeps
the 2-bit codes in memory, `int8` unpacks them once at load).
"""
from __future__ import annotations

from absl import flags

from bitnet_jax import cli
from bitnet_jax.inference.exported import FLOAT_DTYPES, export


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program, so that the
  library functions here can be imported next to other CLIs)."""
  cli.define_run_flags("The trained run to export.", config=False)
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_enum("format", "bitnet_jax",
                    ["bitnet_jax", "hf", "hf-bf16", "gguf"],
                    "bitnet_jax (this project's integer inference model), hf "
                    "(transformers' BitNet layout, packed codes), hf-bf16 "
                    "(its master weights) or gguf (llama.cpp: ternary TQ2_0); "
                    "hf* and gguf for BitNet b1.58 runs only.")
  flags.DEFINE_enum("weights", "packed", ["packed", "int8"],
                    "Linear weights: 2-bit packed (4 per byte) or int8 codes.")
  flags.DEFINE_enum("dtype", "bfloat16", list(FLOAT_DTYPES),
                    "Embedding, head and norms (hf: and the weight scales; "
                    "transformers loads the file in this dtype only).")


def main(argv):
  del argv
  cli.require("workdir", "out")
  from bitnet_jax import rundir
  rundir.check_output(FLAGS.out)  # before anything loads
  from bitnet_jax.inference import pretrained
  pre = pretrained.load(FLAGS.workdir, step=cli.checkpoint_step())
  if FLAGS.format == "gguf":
    from bitnet_jax.gguf_file import writer
    r = writer.write(pre, FLAGS.out)
    print(f"exported step {pre.step} of {FLAGS.workdir} to {r['file']} "
          f"(GGUF, llama.cpp's bitnet architecture, {r['type']} ternary "
          f"weights): {r['tensors']} tensors, {r['bytes'] / 2 ** 20:.2f} MiB")
    return
  if FLAGS.format != "bitnet_jax":
    from bitnet_jax.hf.exporter import export_hf
    r = export_hf(pre, FLAGS.out, FLAGS.format, FLAGS.dtype)
    print(f"exported step {pre.step} of {FLAGS.workdir} to {FLAGS.out} in the "
          f"Hugging Face BitNet layout ({r['format']}, {r['dtype']}): "
          f"{r['tensors']} tensors, {r['bytes'] / 2 ** 20:.2f} MiB, "
          f"{r['tokenizer']}; load it with AutoModelForCausalLM."
          f"from_pretrained(DIR, dtype=torch.{r['dtype']})")
    return
  report = export(pre, FLAGS.out, FLAGS.weights, FLAGS.dtype)
  mib = 1 / 2 ** 20
  print(f"exported step {report['step']} of {FLAGS.workdir} to {FLAGS.out}")
  print(f"  linear weights: {report['linear_weights']:,} -> "
        f"{report['linear_bytes'] * mib:.2f} MiB ({FLAGS.weights}) vs "
        f"{report['linear_bytes_bf16'] * mib:.2f} MiB in bf16 "
        f"(ratio {report['linear_ratio_to_bf16']:.3f})")
  print(f"  embedding, head, norms ({FLAGS.dtype}): {report['other_bytes'] * mib:.2f} MiB;"
        f" file {report['file_bytes'] * mib:.2f} MiB")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
