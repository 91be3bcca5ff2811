"""Optional experiment tracking: Weights & Biases (train.wandb_project).

Only process 0 logs, the same scalars as metrics.jsonl at the same steps.
The W&B run id is kept in <workdir>/wandb_run_id, so a resumed run continues
the same W&B run. WANDB_MODE=offline (or disabled) works without a network;
`wandb sync <workdir>/wandb/offline-run-*` uploads later. W&B keeps its own
files on a local disk: with a gs:// workdir they go to $WANDB_DIR (default
./wandb); the run id file still lives in the workdir. Needs the optional
requirements (requirements-ops.txt).
"""
from __future__ import annotations

import uuid

from bitnet_jax import rundir, storage
from bitnet_jax.errors import ConfigError
from bitnet_jax.run_config import RunConfig

RUN_ID_FILE = "wandb_run_id"


class WandbTracker:
  def __init__(self, project: str, workdir: str, config: RunConfig):
    try:
      import wandb
    except ImportError:
      raise ConfigError("train.wandb_project needs wandb: pip install -r "
                        "requirements-ops.txt") from None
    run = rundir.RunDir(workdir)
    id_file = run.path / RUN_ID_FILE
    if id_file.exists():
      run_id = id_file.read_text().strip()
    else:
      run_id = uuid.uuid4().hex[:16]
      id_file.write_text(run_id)
    self._wandb = wandb
    self.run = wandb.init(project=project, id=run_id, resume="allow",
                          dir=None if storage.is_remote(run.path) else str(run.path),
                          name=run.path.name,
                          config=config.to_config().to_dict())

  def log(self, step: int, scalars: dict) -> None:
    self.run.log(dict(scalars), step=int(step))

  def close(self) -> None:
    self.run.finish()


def make_tracker(config: RunConfig, workdir: str, is_leader: bool):
  """The configured tracker, or None (no project, or not process 0)."""
  project = config.train.wandb_project
  if not project or not is_leader:
    return None
  return WandbTracker(project, workdir, config)
