"""Metric outputs: TensorBoard events, <workdir>/metrics.jsonl, log lines.

Only process 0 writes. metrics.jsonl has one JSON object per logged step:
{"step": ..., "loss": ..., "lr": ..., "wd": ..., "grad_norm": ...,
"tokens_per_sec": ..., "step_time": ..., ...}; evaluation lines carry
"eval_loss". `StepTimer` turns consumed steps into tokens/s, step time, MFU and
an ETA, excluding the first (compiling) step.
"""
from __future__ import annotations

import collections
import json
import math
import statistics
import time
from typing import Mapping

import numpy as np

from bitnet_jax import logs, rundir, storage
from bitnet_jax.errors import Diverged


class MetricWriter:
  """metrics.jsonl, TensorBoard events and an optional tracker (process 0)."""

  def __init__(self, workdir: str, enabled: bool = True, tracker=None):
    self.enabled = enabled
    self.tracker = tracker if enabled else None
    self._tb = None
    self._jsonl = None
    if enabled:
      import tensorboardX  # light, TensorFlow-free event writer
      run = rundir.RunDir(workdir)
      self._tb = tensorboardX.SummaryWriter(
          storage.tensorboard_logdir(run / rundir.TENSORBOARD))
      self._jsonl = storage.GrowingFile(run / rundir.METRICS)

  def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()  # on a remote store: at most every REMOTE_FLUSH_S
    self._tb.flush()
    logs.sync_log_file()
    if self.tracker is not None:
      self.tracker.log(step, clean)

  def mark(self, step: int, fields: Mapping) -> None:
    """A non-scalar row in metrics.jsonl (e.g. where a resumed run starts)."""
    if self.enabled:
      self._jsonl.write(json.dumps({"step": int(step), **fields}) + "\n")
      self._jsonl.flush()

  def histograms(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
    if self.enabled:
      for k, v in arrays.items():
        self._tb.add_histogram(k, np.asarray(v, np.float32).ravel(), step)

  def activation_summaries(self, step: int, stats: Mapping[str, Mapping]) -> None:
    """activation_stats summaries: scalars under activations/<key>/<stat>
    and each histogram as a TensorBoard histogram activations/<key>."""
    if not self.enabled:
      return
    from bitnet_jax.activation_stats import SCALARS
    scalars = {}
    for key, s in stats.items():
      scalars.update({f"activations/{key}/{k}": s[k] for k in SCALARS})
      counts = np.asarray(s["hist_counts"], np.float64)
      edges = np.asarray(s["hist_edges"], np.float64)
      n, mean, std = float(s["count"]), float(s["mean"]), float(s["std"])
      self._tb.add_histogram_raw(
          f"activations/{key}", min=float(edges[0]), max=float(edges[-1]),
          num=n, sum=mean * n, sum_squares=(std ** 2 + mean ** 2) * n,
          bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(),
          global_step=step)
    self.scalars(step, scalars)

  def flush(self) -> None:
    """Everything written so far onto storage (a remote store included:
    called when a checkpoint is saved, so metrics never lag a checkpoint)."""
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush(force=True)
      logs.sync_log_file(force=True)

  def close(self) -> None:
    if self.enabled:
      self.flush()
      self._tb.close()
      self._jsonl.close()
      if self.tracker is not None:
        self.tracker.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class StepTimer:
  """Throughput of the steps consumed since the last report."""

  def __init__(self, tokens_per_step: int, flops_per_token: float,
               peak_flops_total: float | None, stop_step: int):
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak = peak_flops_total
    self.stop_step = stop_step
    self._t0 = None
    self._steps = 0

  def consumed(self, step: int) -> None:
    """Called when step `step`'s results arrived; the first one starts the clock."""
    if self._t0 is None:
      self._t0 = time.perf_counter()
      self._last_step = step
      return
    self._steps += 1

  def report(self, step: int) -> dict[str, float | None]:
    if self._t0 is None or self._steps == 0:
      return {}
    now = time.perf_counter()
    step_time = (now - self._t0) / self._steps
    tps = self.tokens_per_step / step_time
    out = {"step_time": step_time, "tokens_per_sec": tps,
           "eta_sec": step_time * (self.stop_step - step - 1)}
    if self.peak:
      out["mfu"] = tps * self.flops_per_token / self.peak
    self._t0, self._steps = now, 0
    return out


def progress_line(step: int, stop: int, m: Mapping[str, float]) -> str:
  parts = [f"step {step}/{stop} ({100.0 * step / max(stop, 1):.0f}%)",
           f"loss {m['loss']:.4f}", f"lr {m['lr']:.3g}", f"wd {m['wd']:.3g}",
           f"gnorm {m['grad_norm']:.3g}"]
  if "tokens_per_sec" in m:
    parts.append(f"{m['tokens_per_sec']:,.0f} tok/s")
    parts.append(f"{m['step_time']:.3f} s/step")
  if "mfu" in m:
    parts.append(f"MFU {100 * m['mfu']:.1f}%")
  if "eta_sec" in m:
    parts.append(f"ETA {format_duration(m['eta_sec'])}")
  return " | ".join(parts)


def check_finite(step: int, metrics: Mapping[str, float],
                 last_checkpoint: int | None, ckpt_dir: str) -> None:
  """Stop at the first update whose loss, gradient norm or parameters are not
  finite. `step` counts updates done (as metrics.jsonl and checkpoints do)."""
  if metrics.get("finite", 1.0) and math.isfinite(metrics["loss"]) and (
      math.isfinite(metrics.get("grad_norm", 0.0))):
    return
  what = (f"loss {metrics['loss']}, gradient norm {metrics.get('grad_norm')}"
          + ("" if metrics.get("finite", 1.0) else ", parameters not finite"))
  where = (f"the last good checkpoint is step {last_checkpoint} in {ckpt_dir}"
           f"; resume it with --config.train.restore_step={last_checkpoint}"
           if last_checkpoint is not None else "no checkpoint was written yet")
  raise Diverged(
      f"update {step} is not finite ({what}); stopping without saving it "
      f"({where} and a lower opt.lr or a longer opt.warmup_steps)")


class SpikeGuard:
  """Stops a run whose loss diverges while it is still finite: an update
  whose loss is more than `factor` times the median of the last `window`
  updates' losses (judged from the second update on: a run can explode in
  one update; factor 0: off).
  Every update's loss passes here before the save of its step, so every
  saved step came before the spike."""
  MIN_HISTORY = 1

  def __init__(self, factor: float, window: int):
    self.factor = factor
    self.losses: collections.deque = collections.deque(maxlen=window)

  def check(self, step: int, loss: float, last_checkpoint: int | None,
            ckpt_dir: str) -> None:
    if self.factor and len(self.losses) >= self.MIN_HISTORY:
      median = statistics.median(self.losses)
      if median > 0 and loss > self.factor * median:
        where = (f"the last step saved before it is {last_checkpoint} in "
                 f"{ckpt_dir}: resume it with --config.train.restore_step="
                 f"{last_checkpoint} (newer steps are set aside, not deleted) "
                 "and a lower opt.lr or a longer opt.warmup_steps"
                 if last_checkpoint is not None else
                 "no step was saved before it: restart with a lower opt.lr")
        raise Diverged(
            f"update {step}: loss {loss:.4g} is {loss / median:.1f}x the median "
            f"{median:.4g} of the last {len(self.losses)} updates (over "
            f"train.spike_factor={self.factor:g}); stopping without saving "
            f"it ({where})")
    self.losses.append(loss)
