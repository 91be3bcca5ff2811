"""`python -m bitnet_jax.experiments.paper_small`: the paper in miniature.

Trains same-size models on the same tokens and writes OUT/report.md with the
shape of the paper's Tables 1, 2-3, 4 and 5, its findings checked on the
numbers, and figures (loss curves, activation histograms):

  python -m bitnet_jax.experiments.paper_small \
      --data=../shared/data/wikitext2_valid.txt --out=/tmp/paper_small
  python -m bitnet_jax.experiments.paper_small --data=FILE --out=DIR --quick

Runs (see study.RUNS), each at every seed of study.Settings.seeds: fp, b1.58
(a8), a4.8 (a8 -> a4), v2 (a8 -> a4), the Table 5 rotations none /
weight-and-activation (-> a4), and b1.58 / v2 with a4.8's squared-ReLU GLU
(the matched comparison), and v2 (a4) with this project's mean-centred
H-BitLinear; Tables 2-3 re-evaluate the v2 runs with low-bit
Q/K/V; Table 4 quantizes the b1.58 run with QuaRot and SpinQuant (fused and
unfused). Tables show mean ± sd over seeds; each finding gets a verdict by
the rule in seeds.py. The same command again resumes: finished runs and
cached evaluations are reused. --quick is the CI smoke test (tiny models, a
few steps, one seed). --steps overrides the schedule length.
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
from bitnet_jax import rundir


def machine() -> str:
  import jax
  return (f"{os.cpu_count()} CPU cores ({platform.machine()}), "
          f"{jax.devices()[0].platform} backend, jax {jax.__version__}")


def check_settings(out: str, settings: study.Settings, data: str) -> None:
  """Refuse to resume a study directory that was started differently."""
  path = os.path.join(out, "study.json")
  current = json.loads(json.dumps({"settings": dataclasses.asdict(settings),
                                   "data": os.path.abspath(data)}))
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


def score_replica(rep: str, settings: study.Settings, docs,
                  acts: scoring.ActivationStats) -> dict:
  """Tables 1-5 of one seed's runs: {runs, attention, ptq} (cached)."""
  runs = {r.name: scoring.score_run(r, rep, docs, acts) for r in study.RUNS}
  attention = {}
  for name in ("v2_a8", "v2_a4"):
    run = study.RUN_BY_NAME[name]
    attention[name] = {
        label: (runs[name] if not overrides else
                scoring.score_attention(run, rep, overrides, docs))
        for label, overrides in study.ATTENTION_SETTINGS}
  ptq = {name: scoring.score_ptq(name, method, fuse, rep, settings, docs)
         for name, method, fuse in study.PTQ_RUNS}
  rotated = {r.name: scoring.score_rotated(r, rep, acts) for r in study.RUNS}
  return {"runs": runs, "attention": attention, "ptq": ptq, "rotated": rotated}


def replica_seconds(rep: str, scores: dict) -> tuple[float, float]:
  """(training, scoring) wall seconds of one replica, from its logs."""
  train_s = sum(study.train_seconds(os.path.join(rep, "runs", r.name))
                for r in study.RUNS)
  score_s = sum(r["seconds"] for group in ("runs", "ptq", "rotated")
                for r in scores[group].values())
  score_s += sum(scores["attention"][n][label]["seconds"]
                 for n in scores["attention"]
                 for label, o in study.ATTENTION_SETTINGS if o)
  return train_s, score_s


def run_study(data: str, out: str, settings: study.Settings,
              command: str = "") -> dict:
  """Train, score and report every seed; returns the results and what this
  call did (runs trained as '<run>@seed<k>', evaluations new this call)."""
  check_settings(out, settings, data)
  data_info = study.prepare_data(data, out, settings)
  data_dir = os.path.join(out, "data")
  docs = study.valid_documents(out, settings)
  trained, evaluated, replicas, acts = [], [], {}, {}
  train_s = score_s = 0.0
  for seed in settings.seeds:
    s = dataclasses.replace(settings, seed=seed)
    rep = study.replica(out, seed)
    for run in study.RUNS:
      if study.train_run(run, rep, s, data_dir):
        trained.append(f"{run.name}@seed{seed}")
    results_dir = os.path.join(rep, "results")
    before = set(os.listdir(results_dir)) if os.path.isdir(results_dir) else set()
    acts[seed] = scoring.ActivationStats(rep, s, docs)
    replicas[seed] = score_replica(rep, s, docs, acts[seed])
    evaluated += [f"seed{seed}/{f}" for f in
                  sorted(set(os.listdir(results_dir)) - before)]
    t, sc = replica_seconds(rep, replicas[seed])
    train_s, score_s = train_s + t, score_s + sc
  results = {"command": command, "machine": machine(),
             "settings": dataclasses.asdict(settings), "data": data_info,
             "a4_start": settings.a4_start, "seeds": list(settings.seeds),
             "minutes": {"train": train_s / 60, "score": score_s / 60,
                         "data": data_info["seconds"] / 60},
             "replicas": {str(k): v for k, v in replicas.items()}}
  first = study.replica(out, settings.seeds[0])
  fig_dir = os.path.join(out, "figures")
  figures = report.write_figures(first, fig_dir, _activation_runs(
      acts[settings.seeds[0]], settings))
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(report.markdown(results, figures, out))
  return {"results": results, "trained": trained, "evaluated": evaluated,
          "figures": figures}


def _activation_runs(acts: scoring.ActivationStats,
                     settings: study.Settings) -> dict:
  """Raw statistics of the last layer's W_o / W_down inputs of b1.58 (a8)
  and v2 (a8), for the histogram figures."""
  last = f"layer{settings.num_layers - 1}/"
  runs = {}
  for name, label in (("b1.58_a8", "BitNet b1.58 a8"), ("v2_a8", "BitNet v2 a8")):
    stats = acts.of(name)
    runs[label] = {k: v for k, v in stats.items() if k.startswith(last) and
                   k.split("/")[1] in ("o", "down")}
  return runs


def main(argv) -> None:
  from absl import flags
  f = flags.FLAGS
  del argv
  cli.require("data", "out")
  rundir.check_output(f.out, may_hold_runs=True)  # a study holds its own runs
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
