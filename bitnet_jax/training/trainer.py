"""The training run behind `python -m bitnet_jax.train`: setup, then the loop.

Data flow: config -> tokenizer + grain pipeline (numpy rows per process) ->
`jax.make_array_from_process_local_data` onto the mesh -> one jitted
train_step(state, batch) with explicit in/out shardings and the state donated
-> the metrics of step N-1 are fetched after step N is dispatched -> metric
writer -> every train.ckpt_every steps orbax saves {state, data iterator}.
The a8 -> a4 switch: `quant.a4_start_step` swaps in the 4-bit train step
(one recompile, same state); `init_from` continues another run's state.
What the run compiles and shards is run_setup.py; with quant.mean_centre the
loop calibrates the offsets where 4-bit training starts (centring.py).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
from jax.experimental import multihost_utils

from bitnet_jax import logs, rundir
from bitnet_jax.data import corpus as corpus_lib
from bitnet_jax.data import pipeline as data_lib
from bitnet_jax.data import tokenizer as tokenizer_lib
from bitnet_jax.errors import ConfigError, StorageFault
from bitnet_jax import activation_stats
from bitnet_jax.model import Transformer, count_params
from bitnet_jax.training import sharding
from bitnet_jax.training import centring
from bitnet_jax.training import compile_cache
from bitnet_jax.training import profiling
from bitnet_jax.training import tracker as tracker_lib
from bitnet_jax.training.preemption import Preemption
from bitnet_jax import checkpoint as ckpt_lib
from bitnet_jax.training import environment
from bitnet_jax.training import faults
from bitnet_jax.training import restart
from bitnet_jax.training import metrics as metrics_lib
from bitnet_jax.training import train_step as step_lib
from bitnet_jax.training.run_setup import Setup, build
from bitnet_jax import run_config
from bitnet_jax.run_config import RunConfig
from bitnet_jax.training import workdir_lock


class FrozenIteratorState:
  """The data iterator's position at a checkpoint step, for grain's handler
  (which may run after the loop has moved on)."""

  def __init__(self, iterator):
    self._state = json.dumps(iterator.get_state(), indent=2).encode()

  def get_state(self) -> bytes:
    return self._state


def init_from_abstract(setup: Setup, path: str):
  """What init_from's checkpoint is restored as: this config's state, or,
  for a centred model continuing a parent saved without offsets, the
  uncentred model's (centring.add_missing_offsets adds them)."""
  if setup.uncentred is not None and not centring.offset_leaves(
      ckpt_lib.init_from_params(path)):
    return setup.uncentred
  return setup.abstract


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def load_tokenizer(run: RunConfig, workdir: str, corpus
                   ) -> tokenizer_lib.Tokenizer:
  """The configured .model; else this workdir's cached one; else (a4 runs) the
  init_from run's; else one trained on a sample of the training documents."""
  own = rundir.RunDir(workdir).own_tokenizer
  if not run.data.tokenizer and run.init_from and not own.exists():
    ckpt_dir, _ = ckpt_lib.resolve_checkpoint(run.init_from)
    theirs = rundir.RunDir(ckpt_dir.parent).own_tokenizer
    if theirs.exists() and jax.process_index() == 0:
      theirs.copy(rundir.RunDir(workdir).path / theirs.name)
    barrier("bitnet_jax_tokenizer_copy")

  def sample():
    n = max(1, min(len(corpus.train), run.data.tokenizer_train_docs))
    stride = max(1, len(corpus.train) // n)
    return (corpus.train[i] for i in range(0, stride * n, stride))

  return tokenizer_lib.get_tokenizer(
      run.data.tokenizer, workdir, run.model.vocab_size, sample,
      is_leader=jax.process_index() == 0, barrier=barrier)


def load_data(run: RunConfig, workdir: str):
  corpus = corpus_lib.load_corpus(run.data)
  logging.info("data: %s", corpus.description)
  tok = load_tokenizer(run, workdir, corpus)
  pid, count = jax.process_index(), jax.process_count()
  train_ds = data_lib.train_dataset(corpus.train, tok, run.data,
                                    seq_len=run.model.seq_len,
                                    seed=run.seed, process_index=pid,
                                    process_count=count)
  evals = data_lib.eval_batches(corpus.eval, tok, run.data,
                                seq_len=run.model.seq_len,
                                num_batches=run.train.eval_batches,
                                process_index=pid, process_count=count)
  return tok, train_ds, evals


def initial_state(setup: Setup, ckpt: ckpt_lib.Checkpointer, data_iter):
  """Resume this workdir (train.restore_step: that step, newer ones set
  aside), else continue init_from, else initialise."""
  run = setup.run
  if run.train.restore_step >= 0:
    ckpt.set_aside_after(run.train.restore_step)
  state, step = ckpt.restore_latest(setup.abstract, data_iter,
                                    run.train.allow_fresh_start)
  if state is not None:
    logging.info("resumed step %d from %s", step, ckpt.directory)
    return state, step, "resumed"
  if run.init_from:
    target = init_from_abstract(setup, run.init_from)
    state, step, data_ok = ckpt_lib.restore_init_from(run.init_from,
                                                       target, data_iter)
    if target is not setup.abstract:
      state = centring.add_missing_offsets(state, setup.abstract)
    logging.info("init_from %s: continuing at step %d with %d-bit activations "
                 "(optimizer state reused%s)", run.init_from, step,
                 setup.bits_at(step), "" if data_ok else "; data stream restarted")
    return state, step, "init_from"
  if run.train.require_init_from:
    raise ConfigError("this config continues an 8-bit run: set "
                    "--config.init_from=<a8 workdir>")
  init = jax.jit(step_lib.unboxed_init(Transformer(setup.model_cfg), setup.tx),
                 out_shardings=setup.state_sharding)
  state = init(jax.random.PRNGKey(run.seed))
  return state, 0, "initialised"


def held_out_loss(setup: Setup, params, batches, bits: int) -> float:
  total = count = 0.0
  for local in batches:
    t, c = setup.eval_steps[bits](params, sharding.global_batch(local, setup.mesh))
    total, count = total + t, count + c
  return float(total) / max(float(count), 1.0)


def log_start(setup: Setup, workdir: str) -> None:
  run = setup.run
  logging.info("devices: %d x %s, processes: %d, mesh: %s", jax.device_count(),
               jax.devices()[0].device_kind, jax.process_count(),
               dict(setup.mesh.shape))
  logging.info("model: %s, %.2fM parameters (%.2fM non-embedding), %.3g "
               "FLOPs/token; %d tokens/step; schedule %d steps, stop at %d",
               setup.model_cfg.variant, setup.params_total / 1e6,
               count_params(setup.abstract.params, non_embedding=True) / 1e6,
               setup.flops_per_token, run.tokens_per_step, setup.num_steps,
               setup.stop_step)
  config = run.to_config()
  logs.log_file_only(f"config:\n{config}")
  if jax.process_index() == 0:
    rundir.RunDir(workdir).write_config(config)
  logging.info("config: %s (all of it in train.log); lr %g, batch %d x %d, "
               "variant %s, %d-bit activations", os.fspath(
                   rundir.RunDir(workdir) / rundir.CONFIG), run.opt.lr,
               run.data.batch_size, run.model.seq_len,
               run.model.variant, run.model.act_bits)


def train(config, workdir: str, preemption: Preemption | None = None) -> dict:
  """Train until train.stop_step (or preemption); returns a summary dict.
  config: the RunConfig (a ConfigDict is parsed here, once)."""
  run = run_config.parse(config)
  preemption = preemption or Preemption(install=False)
  preemption.every = run.train.preemption_check_every
  rundir.RunDir(workdir).prepare()
  compile_cache.enable(run.train.compile_cache_dir)
  changes = restart.check_identity(run, workdir)  # before compiling
  setup = build(run)
  lock = workdir_lock.WorkdirLock(workdir, enabled=jax.process_index() == 0)
  lock.acquire()  # before anything is written into the workdir
  try:
    summary = _train_locked(setup, workdir, preemption, changes)
    logging.info("done: %s", json.dumps(summary))
    return summary
  except BaseException as e:  # why the run stopped, in train.log too
    logging.error("training stopped: %s: %s", type(e).__name__, e)
    fault = faults.storage_fault(e)
    if fault:
      if jax.process_index() == 0:
        faults.discard_partial_steps(workdir)
      raise StorageFault(f"{fault}; {faults.last_saved(workdir)}") from None
    raise
  finally:
    try:
      logs.close_log_file()  # all of it written, even to gs://
    finally:
      lock.release()


def _train_locked(setup: Setup, workdir: str, preemption, changes=()) -> dict:
  run = setup.run
  if run.init_from and not ckpt_lib.has_checkpoint(workdir):
    # before the tokenizer (or anything else) is taken from that run
    ckpt_lib.check_init_from(run.init_from,
                             init_from_abstract(setup, run.init_from))
  logs.quiet_library_logs()
  logs.log_to_file(workdir, enabled=jax.process_index() == 0)
  log_start(setup, workdir)
  _, train_ds, evals = load_data(run, workdir)
  data_iter = iter(train_ds)
  ckpt = ckpt_lib.Checkpointer(workdir, run.train.keep_ckpts,
                               run.train.async_ckpt)
  leader = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(
      workdir, enabled=leader,
      tracker=tracker_lib.make_tracker(run, workdir, leader))
  try:
    with setup.context():
      state, start, origin = initial_state(setup, ckpt, data_iter)
      if origin != "initialised":  # later rows of metrics.jsonl restart here
        writer.mark(start, {"resumed_from": start, "origin": origin})
      if changes:
        restart.note_config_changes(workdir, start, changes, writer)
      loop = Loop(setup, ckpt, writer, data_iter, evals, preemption, workdir)
      summary = loop.run(state, start)
    summary.update(start_step=start, origin=origin,
                   environment=environment.fingerprint())
    if jax.process_index() == 0:
      rundir.RunDir(workdir).write_summary(summary)
    return summary
  finally:
    writer.close()
    ckpt.close()


class Loop:
  """The step loop: dispatch step N, then read step N-1's metrics."""

  def __init__(self, setup: Setup, ckpt, writer, data_iter, evals,
               preemption, workdir: str = "."):
    train_cfg = setup.run.train
    self.setup, self.train_cfg, self.ckpt, self.writer = (setup, train_cfg,
                                                          ckpt, writer)
    self.data_iter, self.evals, self.preemption = data_iter, evals, preemption
    peak = step_lib.device_peak_flops(jax.devices()[0], train_cfg.peak_flops)
    self.timer = metrics_lib.StepTimer(
        setup.run.tokens_per_step, setup.flops_per_token,
        peak * jax.device_count() if peak else None, setup.stop_step)
    self.last_ckpt = ckpt.latest_step()
    self.spikes = metrics_lib.SpikeGuard(train_cfg.spike_factor,
                                         train_cfg.spike_window)
    self.window: list[dict] = []
    self.pending: tuple[int, Any] | None = None  # the update in flight
    self.summarizers: dict[int, Any] = {}  # act_bits -> jitted summarizer
    self.summary: dict[str, Any] = {"first_loss": None}
    self.centring = setup.model_cfg.mean_centre  # offsets still to check
    self.profile = profiling.ProfileWindow(
        train_cfg.profile_start, train_cfg.profile_steps,
        os.fspath(rundir.RunDir(workdir).path / rundir.TENSORBOARD))

  def consume(self, step: int, metrics) -> None:
    """Read one step's metrics (a host sync on that step only) and log."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics_lib.check_finite(step + 1, m, self.last_ckpt,
                             str(self.ckpt.directory))
    self.spikes.check(step + 1, m["loss"], self.last_ckpt,
                      str(self.ckpt.directory))
    m.pop("finite", None)
    self.timer.consumed(step)
    if self.summary["first_loss"] is None:
      self.summary["first_loss"] = m["loss"]
    self.window.append(m)
    done, stop = step + 1, self.setup.stop_step
    if done % self.train_cfg.log_every and done != stop:
      return
    row = {k: sum(w[k] for w in self.window) / len(self.window)
           for k in self.window[0]}
    row.update(self.timer.report(step))
    row["act_bits"] = self.setup.bits_at(step)
    self.writer.scalars(done, row)
    logging.info(metrics_lib.progress_line(done, stop, row))
    self.window = []
    self.summary["final_loss"] = row["loss"]
    for k in ("tokens_per_sec", "step_time", "mfu"):
      if k in row:
        self.summary[k] = row[k]

  def evaluate(self, state, step: int) -> float:
    loss = held_out_loss(self.setup, state.params, self.evals,
                    self.setup.bits_at(step - 1))
    self.writer.scalars(step, {"eval_loss": loss})
    logging.info("step %d: eval loss %.4f", step, loss)
    return loss

  def analyze(self, state, step: int) -> None:
    """Activation summaries (kurtosis, outliers, int4 zeros, histograms) of
    every layer's projection inputs on the first held-out batch."""
    if not self.evals:
      logging.warning("train.analysis_every needs held-out batches "
                      "(train.eval_batches > 0); skipping")
      return
    bits = self.setup.bits_at(step - 1)
    if bits not in self.summarizers:
      model = Transformer(self.setup.model_cfg.replace(act_bits=bits, remat="none"))
      self.summarizers[bits] = activation_stats.make_summarizer(model)
    batch = sharding.global_batch(self.evals[0], self.setup.mesh)
    stats = jax.device_get(self.summarizers[bits](state.params, batch.inputs))
    self.writer.activation_summaries(step, stats)
    worst = max(stats, key=lambda k: float(stats[k]["kurtosis"]))
    logging.info("step %d: activation summaries of %d layer inputs logged; "
                 "highest kurtosis %.1f (%s)", step, len(stats),
                 float(stats[worst]["kurtosis"]), worst)

  def calibrate(self, state, step: int):
    """Mean-centring offsets from the next training batches (centring.py);
    the data stream is rewound, so training sees the same batches."""
    self.centring = False
    if not centring.needs_calibration(state.params):
      return state
    rewind = self.data_iter.get_state()
    batches = [sharding.global_batch(next(self.data_iter), self.setup.mesh)
               for _ in range(centring.CALIBRATION_BATCHES)]
    self.data_iter.set_state(rewind)
    model = Transformer(self.setup.model_cfg.replace(act_bits=8, remat="none"))
    params, sizes = centring.calibrate(state.params, model, batches)
    centring.log_offsets(step, sizes)
    return state.replace(params=params)

  def save(self, state, step: int, force: bool = False) -> None:
    self.ckpt.save(step, state, FrozenIteratorState(self.data_iter), force=force)
    self.last_ckpt = step
    self.writer.flush()  # metrics and log on storage up to the checkpoint

  def drain(self) -> None:
    """Read the update still in flight (its metrics; the NaN and spike
    guards) before anything that must see it: an eval, an analysis, a save
    (which counts only if that update is finite), the end of the run."""
    if self.pending is not None:
      self.consume(*self.pending)
      self.pending = None

  def run(self, state, start: int) -> dict:
    setup, train_cfg = self.setup, self.train_cfg
    self.pending = None
    for step in range(start, setup.stop_step):
      self.profile.before(step, state)
      bits = setup.bits_at(step)
      if step == setup.run.a4_start_step and step > start:
        logging.info("step %d: switching to 4-bit activations", step)
      if bits == 4 and self.centring:
        state = self.calibrate(state, step)
      batch = sharding.global_batch(next(self.data_iter), setup.mesh)
      state, metrics = setup.steps[bits](state, batch)
      self.drain()  # step N-1, fetched after step N is dispatched
      self.pending = (step, metrics)
      done = step + 1
      if train_cfg.eval_every and done % train_cfg.eval_every == 0 and (
          done < setup.stop_step):
        self.drain()
        self.evaluate(state, done)
      if train_cfg.analysis_every and done % train_cfg.analysis_every == 0:
        self.drain()
        self.analyze(state, done)
      preempted = (self.preemption.agreed(done) or
                   self.ckpt.reached_preemption(done))
      if done % train_cfg.ckpt_every == 0 or preempted:
        self.drain()
        self.save(state, done, force=preempted)
      if preempted:
        self.profile.close(state)
        self.ckpt.wait()
        logging.warning("preempted: saved step %d in %s", done,
                        self.ckpt.directory)
        self.summary.update(preempted=True, final_step=done)
        return self.summary
    self.drain()
    self.profile.close(state)
    final = setup.stop_step
    if self.last_ckpt != final:
      self.save(state, final, force=True)
    self.ckpt.wait()
    self.summary["final_eval_loss"] = self.evaluate(state, final)
    self.summary["final_step"] = final
    return self.summary
