"""`python -m bitnet_jax.experiments.hf_conversion`: a trained BitNet b1.58
through the Hugging Face layout and into BitNet v2, measured.

  python -m bitnet_jax.experiments.hf_conversion \
      --run=/tmp/paper_small/seed0/runs/b1.58_a8 \
      --valid=/tmp/paper_small/data/valid.txt --out=/tmp/hf_conversion

The b1.58 run is exported (`export --format=hf`), imported back as b1.58 and
as v2 (`hf import --to_variant=v2`), and, as the control, as a naive v2 (the
b1.58 weights in a v2 model, nothing rotated). Each is scored on the held-out
text (the b1.58 also as trained; the v2s at 8 and 4 activation bits); then
the converted and the naive v2 continue training at 8 bits for --steps steps
on the run's own training data and are scored again at 8 and 4 bits, and so
does the imported b1.58 (at 8 bits: the control for what the extra steps
alone give). Writes OUT/results.json and prints a table.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time

from absl import flags

from bitnet_jax import cli
from bitnet_jax import rundir
from bitnet_jax.evaluation.perplexity import perplexity
from bitnet_jax.experiments.study import split_text
from bitnet_jax.hf import exporter, importer
from bitnet_jax.inference import pretrained
from bitnet_jax.training import trainer

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("run", None, "A trained BitNet b1.58 run directory.")
  flags.DEFINE_string("valid", None, "Held-out text (blank-line documents).")
  flags.DEFINE_string("out", None, "Output directory (overwritten).")
  flags.DEFINE_integer("steps", 100, "Continued-training steps of the v2s.")
  flags.DEFINE_float("lr", 1e-3, "Peak learning rate of the continued training.")
  flags.DEFINE_integer("max_docs", 0, "Held-out documents (0: all).")


def score(workdir: str, docs, **over) -> float:
  pre = pretrained.load(workdir, **over)
  return perplexity(pre, docs, batch_size=16)["ppl"]


def naive_v2(source: str, dest: str) -> None:
  """The b1.58 import relabelled v2: the same weights, nothing rotated."""
  shutil.copytree(source, dest)
  run = rundir.RunDir(dest)
  config = run.read_config()
  config.model.variant = "v2"
  run.write_config(config)


def continue_training(source_run: str, init_from: str, workdir: str,
                      steps: int, lr: float) -> None:
  config = rundir.RunDir(source_run).read_config()
  config.model = rundir.RunDir(init_from).read_config().model
  config.init_from = init_from
  config.train.update(num_steps=steps, stop_step=-1, stop_fraction=1.0,
                      ckpt_every=steps, log_every=max(1, steps // 10),
                      require_init_from=True)
  config.quant.a4_start_step = -1
  config.opt.update(lr=lr, lr_stage2=lr, warmup_steps=max(1, steps // 10))
  trainer.train(config, workdir)


def main(argv) -> None:
  del argv
  cli.require("run", "valid", "out")
  t0 = time.time()
  with open(FLAGS.valid) as f:
    docs = split_text(f.read())
  docs = docs[:FLAGS.max_docs] if FLAGS.max_docs else docs
  out = FLAGS.out
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  exporter.export_hf(pretrained.load(FLAGS.run), os.path.join(out, "hf"))
  runs = {name: os.path.join(out, name) for name in
          ("b1.58", "v2", "v2_naive", "b1.58_tuned", "v2_tuned",
           "v2_naive_tuned")}
  importer.import_checkpoint(os.path.join(out, "hf"), runs["b1.58"])
  importer.import_checkpoint(os.path.join(out, "hf"), runs["v2"],
                             to_variant="v2")
  naive_v2(runs["b1.58"], runs["v2_naive"])
  r = {"b1.58 as trained": score(FLAGS.run, docs),
       "b1.58 exported and imported": score(runs["b1.58"], docs)}
  for name in ("v2", "v2_naive"):
    for bits in (8, 4):
      r[f"{name} a{bits}, before training"] = score(runs[name], docs,
                                                     act_bits=bits)
  for name in ("b1.58", "v2", "v2_naive"):
    continue_training(FLAGS.run, runs[name], runs[f"{name}_tuned"],
                      FLAGS.steps, FLAGS.lr)
    for bits in ((8,) if name == "b1.58" else (8, 4)):
      r[f"{name} a{bits}, after {FLAGS.steps} steps"] = score(
          runs[f"{name}_tuned"], docs, act_bits=bits)
  result = {"run": os.path.abspath(FLAGS.run), "valid": FLAGS.valid,
            "documents": len(docs), "steps": FLAGS.steps, "lr": FLAGS.lr,
            "ppl": r, "minutes": (time.time() - t0) / 60}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  base = r["b1.58 as trained"]
  print("| model | valid PPL | × b1.58 PPL | × b1.58 loss |\n|---|---:|---:|---:|")
  for k, v in r.items():
    print(f"| {k} | {v:.2f} | {v / base:.3f} | "
          f"{math.log(v) / math.log(base):.3f} |")


if __name__ == "__main__":
  define_flags()
  logging.getLogger().setLevel(logging.INFO)
  cli.run(main)
