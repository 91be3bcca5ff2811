"""The typed run config: built once from the ConfigDict, validated there.

Config files and command-line overrides stay ml_collections (defaults.py is
the schema, every field documented once); a command turns its ConfigDict
into one frozen `RunConfig` at its entry (`RunConfig.from_config`) and passes
that on. Every rule on a field lives here once (ModelConfig's own in
model_config.py) and names the field in one line; rules that need the
devices (does the batch divide the mesh?) stay where the mesh is built.

  RunConfig
    seed, init_from, init_from_any_variant   top-level keys
    model: ModelConfig    config.model + config.quant's model keys
    a4_start_step         config.quant.a4_start_step (the a8 -> a4 switch)
    opt: OptConfig        config.opt
    data: DataConfig      config.data
    mesh: MeshConfig      config.mesh
    train: TrainConfig    config.train (loop, evaluation, checkpoints)

Field names are the config's, so an error's field is the override to fix.
`to_config()` writes the same ConfigDict back (config.json, the tracker).
A run directory written by an older version is read through
`rundir.migrate` (missing fields get the meaning they had then).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from bitnet_jax import defaults
from bitnet_jax.errors import ConfigError
from bitnet_jax.model_config import TRAINING_QUANT_KEYS, ModelConfig
from bitnet_jax.partitioning import MESH_AXES

SOURCES = ("stdlib", "text", "jsonl", "tfds")
PACKINGS = ("concat", "first_fit")
DOC_SPLITS = ("blank_line", "file")
LR_SHAPES = ("linear", "cosine")


def _check(group: str, rules) -> None:
  """rules: (field, ok, what it must be, value); the first broken one raises."""
  for field, ok, rule, value in rules:
    if not ok:
      raise ConfigError(f"{group}.{field} {rule}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class OptConfig:
  """config.opt: the two-stage learning-rate and weight-decay schedule."""
  lr: float
  lr_stage1_end: float
  lr_stage2: float
  lr_end: float
  lr_shape: str
  warmup_steps: int
  stage2_start: float
  weight_decay: float
  weight_decay_stage2: float
  decay_all_params: bool
  b1: float
  b2: float
  eps: float
  grad_clip: float

  def __post_init__(self):
    _check("opt", [
        ("lr", self.lr > 0, "must be > 0", self.lr),
        ("lr_stage2", self.lr_stage2 >= 0, "must be >= 0", self.lr_stage2),
        ("lr_end", self.lr_end >= 0, "must be >= 0", self.lr_end),
        ("lr_shape", self.lr_shape in LR_SHAPES, f"must be one of {LR_SHAPES}",
         self.lr_shape),
        ("warmup_steps", self.warmup_steps >= 0, "must be >= 0",
         self.warmup_steps),
        ("stage2_start", 0 < self.stage2_start <= 1, "must be in (0, 1]",
         self.stage2_start),
        ("weight_decay", self.weight_decay >= 0, "must be >= 0",
         self.weight_decay),
        ("weight_decay_stage2", self.weight_decay_stage2 >= 0, "must be >= 0",
         self.weight_decay_stage2),
        ("b1", 0 <= self.b1 < 1, "must be in [0, 1)", self.b1),
        ("b2", 0 <= self.b2 < 1, "must be in [0, 1)", self.b2),
        ("eps", self.eps > 0, "must be > 0", self.eps),
        ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 = off)",
         self.grad_clip),
    ])

  def stage2_start_step(self, num_steps: int) -> int:
    return int(round(self.stage2_start * num_steps))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """config.data: documents, tokenizer, packing and batching."""
  source: str
  paths: str
  text_field: str
  doc_split: str
  tfds_name: str
  tfds_data_dir: str
  tfds_train_split: str
  tfds_eval_split: str
  eval_fraction: float
  tokenizer: str
  tokenizer_train_docs: int
  batch_size: int
  packing: str
  shuffle_rows: int
  worker_count: int
  prefetch: int
  max_docs: int

  def __post_init__(self):
    _check("data", [
        ("source", self.source in SOURCES, f"must be one of {SOURCES}",
         self.source),
        ("tfds_name", self.source != "tfds" or bool(self.tfds_name),
         "must name a dataset when data.source is tfds", self.tfds_name),
        ("paths", self.source not in ("text", "jsonl") or bool(self.paths),
         "must give files or globs, comma-separated, when data.source is "
         f"{self.source}", self.paths),
        ("doc_split", self.doc_split in DOC_SPLITS,
         f"must be one of {DOC_SPLITS}", self.doc_split),
        ("packing", self.packing in PACKINGS, f"must be one of {PACKINGS}",
         self.packing),
        ("batch_size", self.batch_size > 0, "must be > 0", self.batch_size),
        ("eval_fraction", 0 <= self.eval_fraction < 1, "must be in [0, 1)",
         self.eval_fraction),
        ("shuffle_rows", self.shuffle_rows >= 0, "must be >= 0",
         self.shuffle_rows),
        ("worker_count", self.worker_count >= 0, "must be >= 0",
         self.worker_count),
        ("prefetch", self.prefetch >= 0, "must be >= 0", self.prefetch),
        ("max_docs", self.max_docs >= 0, "must be >= 0 (0 = all)",
         self.max_docs),
    ])

  def replace(self, **changes) -> "DataConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """config.mesh: axis sizes (per slice or host) and the logical rules."""
  data: int
  fsdp: int
  tensor: int
  dcn_data: int
  rules: tuple

  def __post_init__(self):
    sizes = self.sizes()
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be "
                        "positive, with at most one -1 (fill)")
    _check("mesh", [("dcn_data", self.dcn_data >= 1 or self.dcn_data == -1,
                     "must be >= 1 or -1 (auto)", self.dcn_data)])
    rules = []
    for logical, axes in self.rules:  # JSON gives lists: back to tuples
      axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
      for a in (axes if isinstance(axes, tuple) else (axes,)):
        if a is not None and a not in MESH_AXES:
          raise ConfigError(f"mesh.rules: {logical!r} -> unknown mesh axis "
                            f"{a!r}")
      rules.append((logical, axes))
    object.__setattr__(self, "rules", tuple(rules))

  def sizes(self) -> tuple[int, int, int]:
    return tuple(int(getattr(self, a)) for a in MESH_AXES)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """config.train: the loop, evaluation, checkpoints, logging."""
  num_steps: int
  stop_step: int
  stop_fraction: float
  microbatches: int
  log_every: int
  eval_every: int
  eval_batches: int
  ckpt_every: int
  keep_ckpts: int
  async_ckpt: bool
  analysis_every: int
  peak_flops: float
  require_init_from: bool
  allow_fresh_start: bool
  spike_factor: float
  spike_window: int
  restore_step: int
  preemption_check_every: int
  wandb_project: str
  compile_cache_dir: str
  profile_start: int
  profile_steps: int

  def __post_init__(self):
    _check("train", [
        ("num_steps", self.num_steps > 0, "must be > 0", self.num_steps),
        ("stop_fraction", 0 < self.stop_fraction <= 1, "must be in (0, 1]",
         self.stop_fraction),
        ("microbatches", self.microbatches >= 1, "must be >= 1",
         self.microbatches),
        ("log_every", self.log_every >= 1, "must be >= 1", self.log_every),
        ("ckpt_every", self.ckpt_every >= 1, "must be >= 1", self.ckpt_every),
        ("keep_ckpts", self.keep_ckpts >= 0, "must be >= 0 (0 = all)",
         self.keep_ckpts),
        ("eval_every", self.eval_every >= 0, "must be >= 0 (0 = end only)",
         self.eval_every),
        ("eval_batches", self.eval_batches >= 0, "must be >= 0",
         self.eval_batches),
        ("analysis_every", self.analysis_every >= 0, "must be >= 0",
         self.analysis_every),
        ("spike_factor", self.spike_factor == 0 or self.spike_factor > 1,
         "must be > 1 (or 0 = off)", self.spike_factor),
        ("spike_window", self.spike_window >= 3, "must be >= 3",
         self.spike_window),
        ("restore_step", self.restore_step >= -1,
         "must be a saved step (or -1 = the latest)", self.restore_step),
        ("preemption_check_every", self.preemption_check_every >= 1,
         "must be >= 1", self.preemption_check_every),
        ("profile_steps", self.profile_steps >= 0, "must be >= 0",
         self.profile_steps),
    ])
    stop = self.stop
    if not 0 < stop <= self.num_steps:
      raise ConfigError(f"train.stop_step {stop} must be in (0, train.num_steps "
                        f"{self.num_steps}]")

  @property
  def stop(self) -> int:
    """The step the run stops at: stop_step, else num_steps x stop_fraction
    (so overriding train.num_steps alone moves the stop with it)."""
    if self.stop_step >= 0:
      return int(self.stop_step)
    return round(self.num_steps * self.stop_fraction)


GROUPS = {"opt": OptConfig, "data": DataConfig, "mesh": MeshConfig,
          "train": TrainConfig}


def _group(cls, config, name: str):
  values = dict(config[name].items())
  names = {f.name for f in dataclasses.fields(cls)}
  unknown, missing = sorted(set(values) - names), sorted(names - set(values))
  if unknown:
    raise ConfigError(f"unknown {name} config fields {unknown}; the fields are "
                      "listed in bitnet_jax/defaults.py")
  if missing:
    raise ConfigError(f"the {name} config group lacks {missing} (start from "
                      "defaults.base_config(); old run directories are read "
                      "through rundir.migrate)")
  return cls(**values)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a command needs to know about a run, typed and checked."""
  seed: int
  init_from: str
  init_from_any_variant: bool
  model: ModelConfig
  a4_start_step: int
  opt: OptConfig
  data: DataConfig
  mesh: MeshConfig
  train: TrainConfig

  def __post_init__(self):
    mid = self.opt.stage2_start_step(self.train.num_steps)
    if not self.opt.warmup_steps <= mid:
      raise ConfigError(f"opt.warmup_steps {self.opt.warmup_steps} must be <= "
                        f"the stage-2 start (step {mid} = opt.stage2_start x "
                        "train.num_steps)")
    if self.a4_start_step >= 0 and not self.a4_start_step < self.stop_step:
      raise ConfigError(f"quant.a4_start_step {self.a4_start_step} is not "
                        f"inside the run (it stops at step {self.stop_step}): "
                        "it would never switch")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "RunConfig":
    """The one place a ConfigDict becomes a run config (ConfigError on the
    first field outside its range)."""
    top = {"seed", "init_from", "init_from_any_variant"}
    extra = sorted(set(config.keys()) - top - {"model", "quant", *GROUPS})
    if extra:
      raise ConfigError(f"unknown top-level config fields {extra}; the fields "
                        "are listed in bitnet_jax/defaults.py")
    groups = {name: _group(c, config, name) for name, c in GROUPS.items()}
    return cls(seed=int(config.seed), init_from=str(config.init_from),
               init_from_any_variant=bool(config.init_from_any_variant),
               model=ModelConfig.from_config(config),
               a4_start_step=int(config.quant.a4_start_step), **groups)

  def to_config(self) -> ml_collections.ConfigDict:
    """The ConfigDict this was built from (config.json's layout)."""
    model_keys = set(defaults.base_config().model.keys())
    model = dataclasses.asdict(self.model)
    c = ml_collections.ConfigDict()
    c.seed, c.init_from = self.seed, self.init_from
    c.init_from_any_variant = self.init_from_any_variant
    c.model = {k: v for k, v in model.items() if k in model_keys}
    c.quant = {k: v for k, v in model.items() if k not in model_keys}
    c.quant.a4_start_step = self.a4_start_step
    for name in GROUPS:
      c[name] = dataclasses.asdict(getattr(self, name))
    return c

  def replace(self, **changes) -> "RunConfig":
    return dataclasses.replace(self, **changes)

  # The a8 -> a4 schedule: the only place it is derived.

  @property
  def stop_step(self) -> int:
    return self.train.stop

  def bits_at(self, step: int) -> int:
    """Activation bits of update `step` (0-based)."""
    a4 = self.a4_start_step
    return 4 if (a4 >= 0 and step >= a4) else self.model.act_bits

  def trained_bits(self, checkpoint_step: int) -> int:
    """Activation bits of the last update before checkpoint `step` (step N
    holds N updates)."""
    return self.bits_at(checkpoint_step - 1)

  def bits_used(self) -> tuple[int, ...]:
    """The activation widths the run trains with (8 and/or 4)."""
    return tuple(sorted({self.model.act_bits} |
                        ({4} if self.a4_start_step >= 0 else set())))

  @property
  def tokens_per_step(self) -> int:
    return self.data.batch_size * self.model.seq_len


def parse(config: Any) -> RunConfig:
  """A RunConfig as it is; a ConfigDict built into one (library entry points
  take either)."""
  return config if isinstance(config, RunConfig) else RunConfig.from_config(
      config)


assert set(TRAINING_QUANT_KEYS) == {"a4_start_step"}  # RunConfig.a4_start_step
