"""`python -m bitnet_jax.analyze`: activation distributions (Figures 1-3).

For every layer, the inputs of W_qkv, W_up/gate, W_o and W_down on a batch of
real text -- what each layer's activation quantizer sees, and for H-BitLinear
layers also the input before the Hadamard -- summarized by
`activation_stats.summarize`:

  python -m bitnet_jax.analyze --workdir=RUN --out=/tmp/acts
  python -m bitnet_jax.analyze --workdir=B158_RUN,V2_RUN --out=/tmp/acts

writes DIR/summary.json ({"data": ..., "runs": {run: {"layer{i}/{site}/{stage}":
stats}}}, stage `input` = the quantizer's input, `pre_rotation` = before the
Hadamard) and one
PNG per layer and site: histograms with log-scaled counts, the runs side by
side (e.g. BitNet b1.58's W_down input next to BitNet v2's before and after
the Hadamard). The text is the first run's held-out split by default
(--source/--paths as in `bitnet_jax.evaluate`). Training logs the same
summaries to TensorBoard every `train.analysis_every` steps.
"""
from __future__ import annotations

from absl import app, flags

from bitnet_jax import cli
from bitnet_jax.evaluation import document_flags
from bitnet_jax.evaluation.activation_report import analyze


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program, so that the
  library functions here can be imported next to other CLIs)."""
  cli.define_run_flags("One run, or two to compare side by side (e.g. "
                       "b1.58,v2); --config only with a single run.",
                       several=True)
  flags.DEFINE_string("out", None, "Output directory for summary.json and PNGs.")
  flags.DEFINE_integer("num_seqs", 8, "Sequences of the model's context to run.")
  document_flags.define_document_flags(sources=("heldout", "text", "jsonl"),
                            default_split="eval", tfds=False, max_docs=False)
  flags.DEFINE_bool("figures", True, "Write PNG histograms.")


def main(argv):
  del argv
  cli.require("workdir", "out")
  from bitnet_jax import rundir
  rundir.check_output(FLAGS.out)  # summary.json would replace a run's
  if len(FLAGS.workdir) > 2:
    raise app.UsageError("--workdir takes one run or two to compare")
  if FLAGS.config is not None and len(FLAGS.workdir) > 1:
    raise app.UsageError("--config applies to a single --workdir")
  from bitnet_jax.evaluation import perplexity
  from bitnet_jax.inference import pretrained
  pres = [pretrained.load(w, step=cli.checkpoint_step(),
                          config=FLAGS.config if i == 0 else None)
          for i, w in enumerate(FLAGS.workdir)]
  docs, desc = perplexity.corpus_documents(pres[0], document_flags.documents())
  result = analyze(pres, docs, FLAGS.out, FLAGS.num_seqs, FLAGS.figures, desc)
  for label, stats in result["runs"].items():
    print(label)
    for key, s in stats.items():
      print(f"  {key:24s} kurtosis {s['kurtosis']:8.2f}  max/mean "
            f"{s['max_over_mean']:7.2f}  outlier channels {s['outlier_share']:.3f}"
            f"  top channel energy {s['max_channel_energy']:.3f}"
            f"  offset channels {s['offset_channels']:.0f}"
            f"  int4 zeros {s['int4_zero_share']:.3f}")
  print(f"wrote {FLAGS.out}/summary.json and {len(result['figures'])} figures")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
