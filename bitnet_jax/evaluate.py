"""`python -m bitnet_jax.evaluate`: perplexity and lm-evaluation-harness tasks.

Perplexity (the default) of a trained run (--workdir; --config is optional,
the run's own config.json is the default) on any corpus the data pipeline
reads: the run's own held-out split, text or JSON-lines files, or a TFDS split
(e.g. C4 validation):

  python -m bitnet_jax.evaluate --workdir=/tmp/bitnet_tiny
  python -m bitnet_jax.evaluate --workdir=RUN --source=text --paths=valid.txt
  python -m bitnet_jax.evaluate --workdir=RUN --source=tfds \
      --tfds_name=c4/en:3.1.0 --split=validation --tfds_data_dir=gs://BUCKET/tfds

Each document is [BOS] + tokens + [EOS]; its targets (every token after BOS)
are scored in windows of --window inputs (default: the model's context)
starting every --stride tokens (default: the window, i.e. disjoint windows);
a target is scored by the first window that reaches it, with the context that
window holds, so every token counts exactly once.

Zero-shot tasks through lm-evaluation-harness (`pip install -r
requirements-eval.txt`; the tasks download their data on first use):

  python -m bitnet_jax.evaluate --workdir=RUN \
      --tasks=arc_easy,arc_challenge,hellaswag,piqa,winogrande,lambada_openai

--q_bits / --kv_bits / --act_bits evaluate the same weights with low-bit
attention states or other activation bits. Results are printed and written as
JSON (--out, default <workdir>/eval/...).
"""
from __future__ import annotations

import json

from absl import flags
from etils import epath

from bitnet_jax import cli
from bitnet_jax.evaluation import document_flags
from bitnet_jax import rundir
from bitnet_jax.evaluation.perplexity import corpus_documents, perplexity

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program, so that the
  library functions here can be imported next to other CLIs)."""
  cli.define_run_flags("The run to evaluate.")
  document_flags.define_document_flags()
  flags.DEFINE_integer("window", 0, "Inputs per window (0: the model's context).")
  flags.DEFINE_integer("stride", 0, "Tokens between window starts (0: window).")
  flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
  flags.DEFINE_list("tasks", [], "lm-evaluation-harness tasks (instead of PPL).")
  flags.DEFINE_string("include_path", "", "Directory of extra task YAMLs.")
  flags.DEFINE_integer("num_fewshot", 0, "Few-shot examples per task.")
  flags.DEFINE_integer("limit", 0, "Documents per task (0: all).")
  flags.DEFINE_integer("q_bits", 0, "Post-RoPE query bits (0: as trained).")
  flags.DEFINE_integer("kv_bits", 0, "Post-RoPE key/value bits (0: as trained).")
  flags.DEFINE_integer("act_bits", 0, "Activation bits (0: as trained).")
  flags.DEFINE_string("out", "", "JSON result path (default: <workdir>/eval/).")


def overrides_from_flags(flags_) -> dict:
  return {k: getattr(flags_, k) for k in ("q_bits", "kv_bits", "act_bits")
          if getattr(flags_, k)}


def write_json(result: dict, path) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2, default=str))


def main(argv):
  del argv
  cli.require("workdir")
  manager = None
  if FLAGS.tasks:  # an unknown task is an error before anything loads
    from bitnet_jax.evaluation import harness
    manager = harness.task_manager(FLAGS.tasks, FLAGS.include_path or None)
  from bitnet_jax.inference import pretrained
  pre = pretrained.load(FLAGS.workdir, step=cli.checkpoint_step(),
                        config=FLAGS.config, **overrides_from_flags(FLAGS))
  tag = "_".join(f"{k}{v}" for k, v in overrides_from_flags(FLAGS).items())
  if FLAGS.tasks:
    from bitnet_jax.evaluation import harness
    result = harness.run_tasks(pre, FLAGS.tasks, num_fewshot=FLAGS.num_fewshot,
                               limit=FLAGS.limit or None,
                               include_path=FLAGS.include_path or None,
                               batch_size=FLAGS.batch_size, manager=manager)
    print(result.pop("table"))
    name = "tasks"
  else:
    docs, desc = corpus_documents(pre, document_flags.documents())
    result = perplexity(pre, docs, FLAGS.window, FLAGS.stride, FLAGS.batch_size)
    result["data"] = desc
    print(f"step {pre.step}: nll {result['nll']:.4f}, perplexity "
          f"{result['ppl']:.3f} over {result['tokens']:,} tokens of "
          f"{result['documents']} documents ({desc})")
    name = f"ppl_{FLAGS.source}_{desc.rsplit('split ', 1)[-1]}"
  result.update(step=pre.step, workdir=FLAGS.workdir,
                model=overrides_from_flags(FLAGS) or "as trained")
  out = FLAGS.out or (rundir.RunDir(FLAGS.workdir).eval_dir /
                      f"{name}{'_' + tag if tag else ''}.json")
  write_json(result, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
