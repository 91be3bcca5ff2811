"""A run directory: where each file of a run lives, and the one way to read
and write the run-level files. Paths are `etils.epath` paths (local, or any
file system epath reaches; orbax checkpoints already go through it).

Layout of a workdir (what `train` writes; `ptq` writes the same, plus
ptq.json; `evaluate`, `analyze`, `export`, `generate` and the study read it):

  config.json          the resolved config of the run
  tokenizer.model      its sentencepiece model (unless data.tokenizer names one)
  checkpoints/<step>/  orbax steps: state/ (params, optimizer) and data/
  metrics.jsonl        one JSON object per logged step (metrics.py)
  train.log            the log, appended to by each session (process 0)
  tensorboard/         TensorBoard events
  summary.json         the last session's summary (final_step, preempted, ...)
  train.lock           the lease of the trainer running on it (workdir_lock)
  eval/                evaluate's results, one JSON file per evaluation
  config_history.jsonl one row per restart that changed the config (what
                       changed, old and new; run_identity.py)

Loading a run's parameters at a step, with the activation bits that step
trained with, is `pretrained.load`, built on this module.
"""
from __future__ import annotations

import json
import os

from etils import epath
import ml_collections

from bitnet_jax import defaults, storage
from bitnet_jax.errors import MissingInput, UserError

CONFIG = "config.json"
TOKENIZER = "tokenizer.model"          # sentencepiece
TOKENIZER_JSON = "tokenizer.json"      # Hugging Face tokenizers (imported runs)
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
LOG = "train.log"
TENSORBOARD = "tensorboard"
SUMMARY = "summary.json"
LOCK = "train.lock"
EVAL = "eval"
PTQ = "ptq.json"                       # what `ptq` wrote (its runs only)
CONFIG_HISTORY = "config_history.jsonl"  # a restart's allowed config changes


class NotWritable(UserError, OSError):
  """The workdir cannot be created or written."""


class OutputOnRun(UserError, ValueError):
  """An output directory that is, is inside, or holds a run directory."""


def is_run(path) -> bool:
  """Whether a directory is a bitnet_jax run: its config.json or checkpoints."""
  p = epath.Path(path)
  return (p / CONFIG).exists() or (p / CHECKPOINTS).is_dir()


def _readable_run(path) -> bool:
  """is_run, and False where the store cannot be asked (a bucket's root)."""
  try:
    return path.exists() and is_run(path)
  except Exception:  # noqa: BLE001  (gcsfs raises its own HTTP errors)
    return False


def _dirs_at_and_above(p: epath.Path) -> list[epath.Path]:
  """p and its parents; for a URL (gs://bucket/...) up to the bucket: the
  store's root holds buckets, not runs, and asking it lists every bucket
  (an emulator answers 501, which gcsfs retries for half a minute)."""
  dirs = [p, *p.parents]
  scheme, sep, _ = os.fspath(p).partition("://")
  if sep:
    dirs = [d for d in dirs if os.fspath(d).startswith(scheme + sep)
            and os.fspath(d) != scheme + sep]
  return dirs


def check_output(out: str, flag: str = "--out", own: str = "",
                 may_hold_runs: bool = False) -> None:
  """Refuse an output directory that would write into a run: one that is a
  run, lies inside one, or holds one (two levels down; not checked for a
  study, whose directory holds its own runs). `own`: the marker file of a
  run this command itself wrote (ptq.json), which it may replace. Nothing is
  written before this check."""
  p = epath.Path(out)
  for parent in _dirs_at_and_above(p):
    if _readable_run(parent) and not (
        own and parent == p and (p / own).exists()):
      where = "is" if parent == p else f"is inside {os.fspath(parent)}, which is"
      raise OutputOnRun(f"{flag}={out} {where} a run directory: outputs never "
                        f"go into a run; choose another {flag}")
  if p.is_dir() and not may_hold_runs:
    for child in p.iterdir():
      if child.is_dir() and (is_run(child) or any(
          c.is_dir() and is_run(c) for c in child.iterdir())):
        raise OutputOnRun(f"{flag}={out} holds the run directory "
                          f"{os.fspath(child)}: outputs never go into or over "
                          f"a run; choose another {flag}")


def migrate(config: dict) -> dict:
  """A config.json written by an older bitnet_jax, in today's schema, with
  the meaning it was trained with (the one place old run directories are
  read compatibly): runs before `quant.weight_scale` used one absmean scale
  per fused kernel; `quant.ptq_rotation` "" meant none; runs before
  `train.spike_factor` had no spike guard; any other field missing from an
  older schema gets today's default, which is what those runs did."""
  quant = config.get("quant", {})
  if "model" in config and "weight_scale" not in quant:
    quant["weight_scale"] = "tensor"
  if quant.get("ptq_rotation") == "":
    quant["ptq_rotation"] = "none"
  train = config.get("train")
  if isinstance(train, dict) and "spike_factor" not in train:
    train["spike_factor"] = 0.0
  base = defaults.base_config().to_dict()
  for key, value in base.items():
    if isinstance(value, dict):
      group = config.setdefault(key, {})
      for field, default in value.items():
        group.setdefault(field, default)
    else:
      config.setdefault(key, value)
  return config


class RunDir:
  """The files of one run under `path`."""

  def __init__(self, path: str | os.PathLike):
    self.path = epath.Path(path)

  def __repr__(self) -> str:
    return f"RunDir({os.fspath(self.path)!r})"

  def __truediv__(self, name: str) -> epath.Path:
    return self.path / name

  @property
  def checkpoints(self) -> epath.Path:
    return self.path / CHECKPOINTS

  @property
  def eval_dir(self) -> epath.Path:
    return self.path / EVAL

  def prepare(self) -> None:
    """Create the directory and check that it takes a file."""
    if self.path.exists() and not self.path.is_dir():
      raise NotWritable(f"workdir {self.path} is a file, not a directory: "
                        "give a directory (new or a run's)")
    try:
      self.path.mkdir(parents=True, exist_ok=True)
      probe = self.path / f".write_probe_{os.getpid()}"
      probe.write_text("ok")
      probe.unlink()
    except OSError as e:
      raise NotWritable(f"workdir {self.path} is not writable: "
                        f"{e.strerror or e}") from None

  # config.json ------------------------------------------------------------

  def read_config(self) -> ml_collections.ConfigDict:
    path = self.path / CONFIG
    if not path.exists():
      raise MissingInput(f"{self.path} has no {CONFIG}: not a bitnet_jax "
                              "run directory (or pass its config explicitly)")
    return ml_collections.ConfigDict(migrate(json.loads(path.read_text())))

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    storage.write_atomic(self.path / CONFIG, config.to_json_best_effort(indent=2))

  # summary.json -----------------------------------------------------------

  def read_summary(self) -> dict | None:
    path = self.path / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None

  def write_summary(self, summary: dict) -> None:
    storage.write_atomic(self.path / SUMMARY, json.dumps(summary, indent=2))

  # tokenizer --------------------------------------------------------------

  @property
  def own_tokenizer(self) -> epath.Path:
    """Its tokenizer file: tokenizer.model, or tokenizer.json when only that
    exists (a run imported from Hugging Face, or continuing one)."""
    json_file = self.path / TOKENIZER_JSON
    model = self.path / TOKENIZER
    return json_file if json_file.exists() and not model.exists() else model

  def tokenizer_path(self, data) -> epath.Path:
    """The tokenizer the run used (data: its data config): the configured
    file, else its own copy."""
    return epath.Path(data.tokenizer) if data.tokenizer else self.own_tokenizer
