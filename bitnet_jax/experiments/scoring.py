"""Scoring of the study's models: validation perplexity, activation kurtosis,
post-training baselines; each result cached as results/<key>.json."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time

import numpy as np

from bitnet_jax.experiments import study
from bitnet_jax.activation_stats import make_summarizer
from bitnet_jax.baselines import rotation_ptq as ptq
from bitnet_jax.data import corpus
from bitnet_jax.evaluation.activation_report import text_batch
from bitnet_jax.evaluation.perplexity import perplexity
from bitnet_jax.inference import pretrained


def cached(out: str, key: str, compute) -> dict:
  """results/<key>.json if present, else compute() written there."""
  path = os.path.join(out, "results", f"{key}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  t0 = time.time()
  result = compute()
  result["seconds"] = time.time() - t0
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, path)
  return result


def valid_perplexity(pre, docs: list[str]) -> dict:
  r = perplexity(pre, docs, batch_size=16)
  return {"ppl": r["ppl"] if math.isfinite(r["nll"]) else math.nan,
          "nll": r["nll"], "tokens": r["tokens"]}


def layer_stats(pre, docs: list[str], num_seqs: int) -> dict:
  """Raw activation statistics ({"layer{i}/{site}/{stage}": stats}, on the
  host) of the run on num_seqs held-out rows."""
  import jax
  import jax.numpy as jnp
  tokens = text_batch(pre, docs, num_seqs)
  return jax.device_get(make_summarizer(pre.model, pre.tokenizer.bos_id)(
      pre.params, jnp.asarray(tokens)))


class ActivationStats:
  """layer_stats of each run of one replica, computed once per study call:
  Table 1's kurtosis, the rotated-domain table and the histogram figures
  all read the same forward pass over the same rows."""

  def __init__(self, out: str, s: study.Settings, docs: list[str]):
    self.out, self.s, self.docs = out, s, docs
    self._stats: dict[str, dict] = {}

  def of(self, name: str, pre=None) -> dict:
    """The statistics of run `name` (`pre`: the run, if already loaded)."""
    if name not in self._stats:
      pre = pre or pretrained.load(os.path.join(self.out, "runs", name))
      self._stats[name] = layer_stats(pre, self.docs, self.s.analysis_seqs)
    return self._stats[name]


def kurtosis(stats: dict) -> dict:
  """Mean over layers of the kurtosis of the W_o and W_down inputs (what the
  quantizer sees; for H-BitLinear also before the Hadamard)."""
  out = {}
  for site in ("o", "down"):
    for stage in ("input", "pre_rotation"):
      values = [float(v["kurtosis"]) for k, v in stats.items()
                if k.endswith(f"/{site}/{stage}")]
      if values:
        out[f"{site}/{stage}"] = float(np.mean(values))
  return out


ROTATED_STATS = ("kurtosis", "max_channel_energy", "offset_channels")


def rotated_domain(stats: dict) -> dict:
  """{"{site}/{stage}": {stat: value}} of the W_o / W_down inputs (what the
  quantizer sees, and before the Hadamard where there is one): kurtosis and
  the largest per-channel energy share as means over layers, offset channels
  summed over layers."""
  out = {}
  for site in ("o", "down"):
    for stage in ("input", "pre_rotation"):
      rows = [v for k, v in stats.items() if k.endswith(f"/{site}/{stage}")]
      if rows:
        out[f"{site}/{stage}"] = {
            "kurtosis": float(np.mean([r["kurtosis"] for r in rows])),
            "max_channel_energy": float(np.mean(
                [r["max_channel_energy"] for r in rows])),
            "offset_channels": float(np.sum(
                [r["offset_channels"] for r in rows]))}
  return out


def score_rotated(run: study.Run, out: str, acts: ActivationStats) -> dict:
  """The rotated-domain picture of one run (cached apart from its PPL)."""
  return cached(out, f"{run.name}_rotated",
                lambda: {"sites": rotated_domain(acts.of(run.name))})


def score_run(run: study.Run, out: str, docs, acts: ActivationStats) -> dict:
  workdir = os.path.join(out, "runs", run.name)

  def compute():
    pre = pretrained.load(workdir)
    result = valid_perplexity(pre, docs)
    result["kurtosis"] = kurtosis(acts.of(run.name, pre))
    result["train_loss"] = study.final_train_loss(workdir, last=3)
    logging.info("study: %s valid ppl %.3f", run.name, result["ppl"])
    return result
  return cached(out, run.name, compute)


def score_attention(run: study.Run, out: str, overrides: dict, docs) -> dict:
  """Tables 2-3: the run evaluated with low-bit Q/K/V states."""
  key = run.name + "_" + "_".join(f"{k}{v}" for k, v in sorted(overrides.items()))
  return cached(out, key, lambda: valid_perplexity(
      pretrained.load(os.path.join(out, "runs", run.name), **overrides), docs))


def score_ptq(name: str, method: str, fuse: bool, out: str, s: study.Settings,
              docs) -> dict:
  """Table 4: a post-training baseline of the b1.58 (a8) run."""

  def compute():
    source = pretrained.load(os.path.join(out, "runs", "b1.58_a8"))
    rows = None
    if method == "spinquant":
      train_docs = corpus.load_corpus(source.run.data).train
      rows = ptq.calibration_rows(source.tokenizer, train_docs,
                                  s.calib_samples, source.model_cfg.seq_len)
    cfg, params, info = ptq.quantize(
        source, method, fuse, seed=s.seed, calib_rows=rows,
        steps=s.calib_steps, lr=s.calib_lr, batch=8)
    workdir = os.path.join(out, "ptq", name)
    if os.path.exists(workdir):  # left by an interrupted study
      shutil.rmtree(workdir)
    ptq.write_run(source, workdir, cfg, params, info)
    result = valid_perplexity(pretrained.load(workdir), docs)
    result.update({k: v for k, v in info.items()
                   if k in ("calib_loss_start", "calib_loss_end",
                            "orthogonality_error", "calib_rows")})
    logging.info("study: %s valid ppl %.3f", name, result["ppl"])
    return result
  return cached(out, name, compute)
