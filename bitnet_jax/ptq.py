"""`python -m bitnet_jax.ptq`: post-training rotation baselines (Table 4).

Quantizes a trained BitNet b1.58 run to ternary weights and 4-bit activations
the way the paper's baselines do (Sec. 3.2):

  --method=quarot     a random Hadamard rotation R = diag(s) H (s = +-1) of
                      the input of every projection (W_qkv, W_o, W_up,gate,
                      W_down), applied online with `fwht`;
  --method=spinquant  the rotations learned on a calibration set (the paper:
                      800 samples) by Cayley SGD on the orthogonal group,
                      starting from the QuaRot rotations, minimising the
                      quantized model's next-token loss (straight-through).

Weights stay absmean ternary (no GPTQ), activations are quantized per token
with absmax at 4 bits (--act_bits), each projection keeps its RMSNorm scale
(not fused). --fuse_rotation (or --fuse-rotation) stores Q_w(R^T W) for every
projection; without it W_qkv and W_up,gate compute Q_x(x R) R^T Q_w(W) (their
rotation undone in float: W16A4) while W_o and W_down stay fused.

The output directory is a run like any other: config.json, tokenizer.model,
checkpoints/<step>/state (params only) and ptq.json (method, calibration
losses), so `python -m bitnet_jax.evaluate --workdir=OUT` scores it.

  python -m bitnet_jax.ptq --method=quarot --workdir=RUN --out=RUN_quarot
  python -m bitnet_jax.ptq --method=spinquant --workdir=RUN --out=RUN_spin \
      --calib_source=text --calib_paths=wikitext2_train.txt --fuse-rotation
"""
from __future__ import annotations

import json
import logging
import sys

from etils import epath

from bitnet_jax import cli, rundir, storage
from bitnet_jax.evaluation import document_flags
from bitnet_jax.baselines.rotation_ptq import (METHODS, calibration_rows,
                                               ptq_config, quantize, write_run)
from bitnet_jax.errors import ConfigError


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_enum("method", None, list(METHODS), "quarot or spinquant.")
  cli.define_run_flags("The trained BitNet b1.58 run.", config=False)
  flags.DEFINE_string("out", None, "Output run directory.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out run.")
  flags.DEFINE_bool("fuse_rotation", False, "Fuse the rotation into W_qkv and "
                    "W_up,gate too (Q_w(W R^T)); default keeps it outside.")
  flags.DEFINE_integer("act_bits", 4, "Activation bits (absmax).")
  flags.DEFINE_integer("seed", 0, "Seed of the random Hadamard signs.")
  document_flags.define_document_flags(
      "calib_", default_split="train", max_docs=False,
      split_help="SpinQuant calibration text: eval or train (tfds: a split).")
  flags.DEFINE_integer("calib_samples", 800, "Calibration rows of the model's "
                       "context length (the paper: 800).")
  flags.DEFINE_integer("calib_steps", 100, "Cayley SGD steps.")
  flags.DEFINE_integer("calib_batch", 8, "Rows per Cayley SGD step.")
  flags.DEFINE_float("lr", 1.5, "Cayley SGD learning rate.")


def _dashes_to_underscores(argv: list[str]) -> list[str]:
  """Accept --fuse-rotation as well as --fuse_rotation."""
  out = [argv[0]]
  for arg in argv[1:]:
    if arg.startswith("--"):
      name, eq, value = arg[2:].partition("=")
      arg = "--" + name.replace("-", "_") + eq + value
    out.append(arg)
  return out


def main(argv):
  del argv
  from absl import app, flags
  from bitnet_jax.inference import pretrained
  from bitnet_jax.evaluation.perplexity import corpus_documents
  f = flags.FLAGS
  cli.require("method", "workdir", "out")
  if storage.same_path(f.out, f.workdir):
    raise app.UsageError("--out must differ from --workdir")
  rundir.check_output(f.out, own=rundir.PTQ)  # a trained run is never replaced
  if rundir.RunDir(f.out).checkpoints.exists():
    if not f.overwrite:
      raise ConfigError(f"{f.out} already holds a run; pass --overwrite to "
                        "replace it")
    epath.Path(f.out).rmtree()
  pre = pretrained.load(f.workdir, step=cli.checkpoint_step())
  ptq_config(pre.model_cfg, f.method, f.fuse_rotation, f.act_bits)
  rows = None
  if f.method == "spinquant":
    docs, desc = corpus_documents(pre, document_flags.documents("calib_"))
    rows = calibration_rows(pre.tokenizer, docs, f.calib_samples,
                            pre.model_cfg.seq_len)
    logging.info("calibration: %d rows of %d tokens from %s", len(rows),
                 rows.shape[1], desc)
  cfg, params, info = quantize(
      pre, f.method, f.fuse_rotation, act_bits=f.act_bits, seed=f.seed,
      calib_rows=rows, steps=f.calib_steps, lr=f.lr, batch=f.calib_batch)
  write_run(pre, f.out, cfg, params, info)
  summary = {k: v for k, v in info.items() if k != "history"}
  print(json.dumps(summary, indent=2))
  print(f"wrote {f.out} (evaluate: python -m bitnet_jax.evaluate "
        f"--workdir={f.out})")


if __name__ == "__main__":
  define_flags()
  cli.run(main, argv=_dashes_to_underscores(sys.argv))
