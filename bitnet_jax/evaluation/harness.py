"""lm-evaluation-harness adapter: a trained bitnet_jax run as an `lm_eval` LM.

Registered as `bitnet_jax`, so the harness's own CLI works too:
  lm_eval --model bitnet_jax --model_args workdir=RUN,batch_size=16 --tasks arc_easy
(import bitnet_jax.evaluation.harness first, e.g. with `python -m bitnet_jax.evaluate
--tasks=...`, which calls `run_tasks`).

Scoring is batched and jitted (`Pretrained.scorer`); rows are padded to
power-of-two lengths so only a few shapes compile. Sequences longer than the
model's context keep their last tokens (left truncation), as the harness's
own models do. `generate_until` decodes greedily.
"""
from __future__ import annotations

import numpy as np

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from bitnet_jax.evaluation import perplexity as perplexity_lib
from bitnet_jax.inference import generation as generate_lib
from bitnet_jax.errors import ConfigError


def _bucket(n: int, cap: int) -> int:
  size = 16
  while size < n:
    size *= 2
  return min(size, cap)


@register_model("bitnet_jax")
class BitNetLM(LM):
  """A bitnet_jax run for lm_eval.simple_evaluate."""

  def __init__(self, workdir: str = "", step: int | None = None,
               batch_size: int = 8, max_length: int | None = None,
               pretrained=None, **overrides):
    super().__init__()
    if pretrained is None:
      from bitnet_jax.inference import pretrained as pretrained_lib
      pretrained = pretrained_lib.load(workdir, step=step, **{
          k: int(v) for k, v in overrides.items() if v})
    self.pre = pretrained
    self.batch_size = int(batch_size)
    self.max_length = int(max_length or pretrained.model_cfg.seq_len)
    self.tok = pretrained.tokenizer

  # -- tokenization -------------------------------------------------------
  def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens, splitting the joint encoding so that
    merges across the boundary are scored as the model would see them."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.tok.encode(context + continuation)
    ctx = self.tok.encode(context)
    if whole[:len(ctx)] != ctx:  # a merge crossed the boundary
      ctx = whole[:len(ctx) - 1] if len(ctx) > 1 else []
    return [self.tok.bos_id, *ctx], whole[len(ctx):]

  # -- scoring ------------------------------------------------------------
  def _score(self, pairs: list[tuple[list[int], list[int]]]):
    """(sum log p(continuation), all greedy) for each (context, continuation)."""
    results = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) +
                                                      len(pairs[i][1])))
    cap = self.max_length + 1
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      seqs = [(pairs[i][0] + pairs[i][1])[-cap:] for i in idx]
      width = _bucket(max(len(s) for s in seqs), cap)
      rows = np.zeros((self.batch_size, width), np.int32)
      for r, s in enumerate(seqs):
        rows[r, :len(s)] = s
      lp, greedy = self.pre.scorer(self.pre.params, rows)
      lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
      for r, i in enumerate(idx):
        n_cont, n = len(pairs[i][1]), len(seqs[r])
        sl = slice(n - 1 - n_cont, n - 1)  # targets of the continuation
        results[i] = (float(lp[r, sl].sum()), bool(greedy[r, sl].all()))
    return results

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    pairs = [self._pair(*req.args[:2]) for req in requests]
    return self._score(pairs)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    """log p(text) with [BOS] + tokens in disjoint windows of the context
    (the perplexity path with stride = window, without the EOS target)."""
    tokens = [[self.tok.bos_id, *self.tok.encode(req.args[0])]
              for req in requests]
    lps, _ = perplexity_lib.target_logprobs(self.pre, tokens, self.max_length,
                                          self.max_length, self.batch_size)
    return [float(lp.sum()) for lp in lps]

  def generate_until(self, requests, disable_tqdm: bool = False):
    out = []
    for req in requests:
      context, gen_kwargs = req.args[0], dict(req.args[1])
      until = gen_kwargs.get("until") or []
      if isinstance(until, str):
        until = [until]
      max_new = int(gen_kwargs.get("max_gen_toks", 64))
      text = generate_lib.generate_text(self.pre, [context], max_new_tokens=max_new,
                                        stop=until)[0]
      out.append(text)
    return out


def task_manager(tasks: list[str], include_path: str | None = None):
  """lm-eval's TaskManager, after checking that every task exists (before
  any checkpoint loads); unknown task names are one error line."""
  from lm_eval.tasks import TaskManager
  manager = TaskManager(include_path=include_path)
  unknown = [t for t in tasks if not manager.match_tasks([t])]
  if unknown:
    raise ConfigError(f"unknown lm-eval task(s) {unknown}; list them with "
                     "`lm_eval --tasks list`")
  return manager


def run_tasks(pre, tasks: list[str], num_fewshot: int = 0, limit=None,
              include_path: str | None = None, batch_size: int = 8,
              manager=None) -> dict:
  """lm_eval.simple_evaluate on a loaded run; unknown task names are an error."""
  from lm_eval import evaluator, utils
  manager = manager or task_manager(tasks, include_path)
  results = evaluator.simple_evaluate(
      model=BitNetLM(pretrained=pre, batch_size=batch_size), tasks=tasks,
      num_fewshot=num_fewshot, limit=limit, task_manager=manager,
      log_samples=False)
  return {"table": utils.make_table(results), "results": results["results"],
          "configs": {k: str(v) for k, v in results.get("configs", {}).items()}}
