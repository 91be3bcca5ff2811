"""Activation statistics of one or two runs as a report: per-layer summaries
and histogram figures (the command is bitnet_jax/analyze.py).

See the command's docstring for usage.
"""
from __future__ import annotations

import json

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import sites, storage
from bitnet_jax.progress import Progress
from bitnet_jax import activation_stats
from bitnet_jax.activation_stats import STAGES, make_summarizer


def text_batch(pre, docs: list[str], num_seqs: int) -> np.ndarray:
  """The documents as [BOS] doc [EOS] ..., cut into num_seqs rows of the
  model's context."""
  from bitnet_jax.evaluation.perplexity import token_rows
  return token_rows(pre.tokenizer, docs, num_seqs, pre.model_cfg.seq_len)


def to_json(stats: dict) -> dict:
  out = {k: float(stats[k]) for k in activation_stats.SCALARS}
  out["outlier_channels"] = np.flatnonzero(np.asarray(stats["outlier_mask"])).tolist()
  return out


def run_label(pre) -> str:
  cfg = pre.model_cfg
  name = {"v2": "BitNet v2", "b1.58": "BitNet b1.58", "a4.8": "BitNet a4.8",
          "fp": "float"}.get(cfg.variant, cfg.variant)
  bits = "" if cfg.variant == "fp" else f" a{cfg.act_bits}"
  return f"{name}{bits} ({epath.Path(pre.workdir).name})"


def write_figures(out_dir: str, runs: dict[str, dict]) -> list[str]:
  """One PNG per layer and site; a panel per (run, stage), log counts."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  order = [s.name for s in sites.SITES]
  keys = sorted({k.rsplit("/", 1)[0] for stats in runs.values() for k in stats},
                key=lambda k: (int(k.split("/")[0][5:]), order.index(k.split("/")[1])))
  written = []
  progress = Progress(len(keys), "figures", "drawing")
  for key in keys:
    progress.advance()
    panels = [(label, stage, stats[f"{key}/{stage}"]) for label, stats in runs.items()
              for stage in STAGES if f"{key}/{stage}" in stats]
    rotated = {label for label, stage, _ in panels if stage == "pre_rotation"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3),
                             dpi=100, squeeze=False)
    layer, site = key.split("/")
    for ax, (label, stage, s) in zip(axes[0], panels):
      edges = np.asarray(s["hist_edges"], np.float64)
      counts = np.asarray(s["hist_counts"], np.float64)
      ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge")
      ax.set_yscale("log")
      where = {"pre_rotation": "before Hadamard",
               "input": "after Hadamard" if label in rotated else "input"}[stage]
      ax.set_title(f"{label}\n{sites.BY_NAME[site].title} {where}", fontsize=8)
      ax.set_xlabel(f"kurtosis {float(s['kurtosis']):.1f}, "
                    f"max/mean {float(s['max_over_mean']):.1f}", fontsize=7)
    fig.suptitle(f"{layer}: inputs of {sites.BY_NAME[site].title}", fontsize=9)
    fig.subplots_adjust(top=0.72, bottom=0.2, wspace=0.3)
    path = epath.Path(out_dir) / f"{layer}_{site}.png"
    storage.write_figure(fig, path)
    plt.close(fig)
    written.append(str(path))
  return written


def analyze(pres: list, docs: list[str], out_dir: str, num_seqs: int = 8,
            figures: bool = True, data_desc: str = "") -> dict:
  """Summaries (and figures) of each run on the same documents, each read
  with its run's own tokenizer; writes out_dir/summary.json."""
  runs = {}
  for pre in pres:
    tokens = text_batch(pre, docs, num_seqs)
    label = run_label(pre)
    if label in runs:
      label = f"{label} #{len(runs) + 1}"
    summarizer = make_summarizer(pre.model, pre.tokenizer.bos_id)
    runs[label] = jax.device_get(summarizer(pre.params, jnp.asarray(tokens)))
  summary = {label: {k: to_json(v) for k, v in sorted(stats.items())}
             for label, stats in runs.items()}
  out = storage.makedirs(out_dir)
  (out / "summary.json").write_text(json.dumps(
      {"data": f"{data_desc}, {tokens.shape[0]} x {tokens.shape[1]} tokens",
       "runs": summary}, indent=2))
  files = write_figures(out_dir, runs) if figures else []
  return {"runs": summary, "figures": files}
