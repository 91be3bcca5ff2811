"""`python -m bitnet_jax.experiments.paper_small`: the paper in miniature.

Trains same-size models on the same tokens and writes OUT/report.md with the
shape of the paper's Tables 1, 2-3, 4 and 5, its findings checked on the
numbers, and figures (loss curves, activation histograms):

  python -m bitnet_jax.experiments.paper_small \
      --data=../shared/data/wikitext2_valid.txt --out=/tmp/paper_small
  python -m bitnet_jax.experiments.paper_small --data=FILE --out=DIR --quick

Runs (see study.RUNS): fp, b1.58 (a8), a4.8 (a8 -> a4), v2 (a8 -> a4) and
the Table 5 rotations none / weight-and-activation (a8 -> a4); Tables 2-3
re-evaluate the v2 runs with low-bit Q/K/V; Table 4 quantizes the b1.58 run
with QuaRot and SpinQuant (fused and unfused). The same command again resumes:
finished runs and cached evaluations are reused. --quick is the CI smoke
test (tiny models, a few steps). --steps overrides the schedule length.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shlex
import sys

from bitnet_jax import cli
from bitnet_jax.errors import InputError
from bitnet_jax.experiments import report, scoring, study


def machine() -> str:
  import jax
  return (f"{os.cpu_count()} CPU cores ({platform.machine()}), "
          f"{jax.devices()[0].platform} backend, jax {jax.__version__}")


def check_settings(out: str, settings: study.Settings, data: str) -> None:
  """Refuse to resume a study directory that was started differently."""
  path = os.path.join(out, "study.json")
  current = {"settings": dataclasses.asdict(settings),
             "data": os.path.abspath(data)}
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    if before != current:
      raise InputError(f"{out} holds a study started with other settings or "
                       f"data ({path}); use another --out")
    return
  os.makedirs(out, exist_ok=True)
  with open(path, "w") as f:
    json.dump(current, f, indent=2)


def run_study(data: str, out: str, settings: study.Settings,
              command: str = "") -> dict:
  """Train, score and report; returns the results and what this call did."""
  check_settings(out, settings, data)
  data_info = study.prepare_data(data, out, settings)
  trained = []
  for run in study.RUNS:
    if study.train_run(run, out, settings):
      trained.append(run.name)
  docs = study.valid_documents(out, settings)
  before = set(os.listdir(os.path.join(out, "results"))) if os.path.isdir(
      os.path.join(out, "results")) else set()
  runs = {r.name: scoring.score_run(r, out, settings, docs) for r in study.RUNS}
  attention = {}
  for name in ("v2_a8", "v2_a4"):
    run = study.RUN_BY_NAME[name]
    attention[name] = {
        label: (runs[name] if not overrides else
                scoring.score_attention(run, out, overrides, docs))
        for label, overrides in study.ATTENTION_SETTINGS}
  ptq = {name: scoring.score_ptq(name, method, fuse, out, settings, docs)
         for name, method, fuse in study.PTQ_RUNS}
  after = set(os.listdir(os.path.join(out, "results")))
  train_s = sum(study.train_seconds(os.path.join(out, "runs", r.name))
                for r in study.RUNS)
  score_s = sum(r["seconds"] for group in (runs, ptq) for r in group.values())
  score_s += sum(attention[n][label]["seconds"] for n in attention
                 for label, o in study.ATTENTION_SETTINGS if o)
  results = {"command": command, "machine": machine(),
             "settings": dataclasses.asdict(settings), "data": data_info,
             "a4_start": settings.a4_start,
             "minutes": {"train": train_s / 60, "score": score_s / 60,
                         "data": data_info["seconds"] / 60},
             "runs": runs, "attention": attention, "ptq": ptq}
  fig_dir = os.path.join(out, "figures")
  figures = report.write_figures(results, out, fig_dir,
                                 _activation_runs(out, docs, settings))
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(report.markdown(results, figures, out))
  return {"results": results, "trained": trained,
          "evaluated": sorted(after - before), "figures": figures}


def _activation_runs(out: str, docs, settings: study.Settings) -> dict:
  """Raw statistics of the last layer's W_o / W_down inputs of b1.58 (a8)
  and v2 (a8), for the histogram figures."""
  from bitnet_jax.inference import pretrained
  last = f"layer{settings.num_layers - 1}/"
  runs = {}
  for name, label in (("b1.58_a8", "BitNet b1.58 a8"), ("v2_a8", "BitNet v2 a8")):
    pre = pretrained.load(os.path.join(out, "runs", name))
    stats = scoring.layer_stats(pre, docs, settings.analysis_seqs)
    runs[label] = {k: v for k, v in stats.items() if k.startswith(last) and
                   k.split("/")[1] in ("o", "down")}
  return runs


def main(argv) -> None:
  from absl import flags
  f = flags.FLAGS
  del argv
  cli.require("data", "out")
  settings = study.QUICK if f.quick else study.Settings()
  if f.steps:
    settings = dataclasses.replace(settings, steps=f.steps)
  command = "python -m bitnet_jax.experiments.paper_small " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  done = run_study(f.data, f.out, settings, command)
  report_path = os.path.join(f.out, "report.md")
  print(f"trained {len(done['trained'])} runs, {len(done['evaluated'])} new "
        f"evaluations; wrote {report_path}")
  if f.readme:
    report.sync_readme(report_path, f.readme)
    print(f"copied its tables and findings into {f.readme}")


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("data", None, "A text file (e.g. ../shared/data/"
                      "wikitext2_valid.txt); the script splits it.")
  flags.DEFINE_string("out", None, "Study directory (resumable).")
  flags.DEFINE_bool("quick", False, "CI smoke test: tiny models, few steps.")
  flags.DEFINE_integer("steps", 0, "Override the schedule length (0: default).")
  flags.DEFINE_string("readme", "", "Also copy the report's tables and findings "
                      "into this README, between its paper_small markers.")


if __name__ == "__main__":
  define_flags()
  logging.getLogger().setLevel(logging.INFO)
  cli.run(main)
