"""`python -m bitnet_jax.train --config=configs/tiny.py --workdir=/tmp/run`.

Flags:
  --config=FILE           a configs/*.py file; override fields with
                          --config.opt.lr=1e-3 (unknown keys are an error)
  --workdir=DIR           checkpoints, tokenizer, metrics.jsonl, TensorBoard
                          events, config.json, train.log, summary.json; a run
                          resumes the latest checkpoint in it automatically
  --dry_run               compile the train step from abstract shapes (nothing
                          allocated) and report per chip: memory, FLOPs,
                          collectives, a roofline estimate of step time and
                          MFU (see bitnet_jax/scale/dry_run.py); then exit
  --topology=NAME         with --dry_run: compile for a TPU slice described by
                          libtpu (v5p:4x4x4, v5e:16x16, v6e:8x8, ...; no TPU
                          needed), for NVIDIA GPUs (h100:8 = one host of 8,
                          h100:8x8 = 8 hosts x 8; h200, a100, b200; the CUDA
                          plugin, no GPU needed) or for N host CPU devices
                          (cpu:N)
  --dry_run_json=FILE     with --dry_run: also write the report as JSON
  --num_slices=N          with --dry_run --topology: N slices of it joined
                          along data parallelism (mesh.dcn_data=N)
  --distributed=auto|on|off   join a multi-process run (auto: TPU pod, SLURM
                          or --coordinator_address); see launch/
  --coordinator_address, --num_processes, --process_id   explicit multi-process
SIGTERM / Ctrl-C save a checkpoint at the next step boundary, then exit.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from bitnet_jax import chips, cli
from bitnet_jax.errors import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (created if missing).")
flags.DEFINE_bool("dry_run", False, "Compile from abstract shapes, report "
                  "memory, FLOPs, collectives and a roofline estimate.")
flags.DEFINE_string("topology", "", "With --dry_run: a libtpu topology "
                    "(v5p:4x4x4, v5e:16x16, ...), GPUs as MODEL:GPUS or "
                    "MODEL:HOSTSxGPUS (h100:8, h100:8x8; h200, a100, b200) "
                    "or cpu:N.")
flags.DEFINE_string("dry_run_json", "", "With --dry_run: write the report here.")
flags.DEFINE_integer("num_slices", 1, "With --dry_run --topology: that many "
                     "slices joined along data parallelism (mesh.dcn_data).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize().")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
flags.DEFINE_integer("num_processes", 0, "Processes in the run (explicit mode).")
flags.DEFINE_integer("process_id", -1, "This process's index (explicit mode).")


def parse_flags(argv):
  """absl parsing, but a bad --config.* override is one line, not a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except (OSError, SyntaxError) as e:  # the config file itself
    detail = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    path = next((a.split("=", 1)[1] for a in reversed(argv[1:])
                 if a.startswith("--config=")), "?")
    print(f"error: cannot load --config={path}: {detail}", file=sys.stderr)
  except (KeyError, AttributeError, ValueError, TypeError) as e:
    key = str(e).strip("'\"")
    culprit = next((a for a in argv[1:] if a.startswith("--config.") and key in a),
                   "a --config.* override")
    print(f"error: {culprit}: no such config field or a bad value ({key}); "
          "the fields are listed in bitnet_jax/defaults.py", file=sys.stderr)
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = FLAGS.config
    if config is None:
      raise app.UsageError("--config is required")
    config.keys()  # ml_collections defers a failed load to the first access
  except (OSError, SyntaxError, AttributeError) as e:
    detail = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    raise ConfigError(f"cannot load --config="
                      f"{config_flags.get_config_filename(FLAGS['config'])}: "
                      f"{detail}") from None
  if not FLAGS.workdir and not FLAGS.dry_run:
    raise app.UsageError("--workdir is required (except with --dry_run)")
  if FLAGS.topology and not FLAGS.dry_run:
    raise app.UsageError("--topology is for --dry_run")
  # a GPU run's allocator share (chips.GPU_MEMORY_FRACTION: what the fit
  # table fits against; JAX's default would leave a quarter unused)
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION",
                        str(chips.GPU_MEMORY_FRACTION))
  if FLAGS.topology:  # compile-only devices: no local accelerator needed
    os.environ["JAX_PLATFORMS"] = "cpu"
  if FLAGS.topology.startswith("cpu:"):  # before jax starts its CPU backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count="
                               + str(int(FLAGS.topology[4:]) *
                                     max(1, FLAGS.num_slices))).strip()
  from bitnet_jax.run_config import RunConfig
  run = RunConfig.from_config(config)  # the one typed, checked config
  from bitnet_jax.training import sharding
  sharding.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address,
                                  FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.dry_run:
    from bitnet_jax.scale import dry_run
    dry_run.run(run, FLAGS.topology, FLAGS.dry_run_json, FLAGS.num_slices)
    return
  from bitnet_jax.training import trainer  # jax-heavy modules after init
  trainer.train(run, FLAGS.workdir, trainer.Preemption())


if __name__ == "__main__":
  cli.run(main, flags_parser=parse_flags)
