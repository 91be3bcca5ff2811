"""`python -m bitnet_jax.experiments.gguf_check --workdir=RUN --gguf=FILE`:
a run and its GGUF export (`export --format=gguf`) scored on the same
documents in the same windows, by bitnet_jax (as `python -m
bitnet_jax.evaluate` scores them) and by llama.cpp (through
llama-cpp-python, requirements-gguf-check.txt: it builds llama.cpp from
source at install). Prints both perplexities and how far the next-token
log-probabilities lie apart; the documents are the run's held-out split
unless --source / --paths / --split say otherwise (as for evaluate).
"""
from __future__ import annotations

import math

import numpy as np
from absl import flags

from bitnet_jax import cli
from bitnet_jax.evaluation import document_flags
from bitnet_jax.evaluation import perplexity

FLAGS = flags.FLAGS


def llama_cpp_logprobs(gguf_path: str, token_lists, window: int, stride: int,
                       threads: int = 2) -> list[np.ndarray]:
  """log p(token t | its window) for t = 1 .. n-1 of each list, from
  llama.cpp, in the windows `perplexity.window_plan` gives (each window
  evaluated from an empty KV cache, as bitnet_jax scores it)."""
  from llama_cpp import Llama
  llm = Llama(model_path=gguf_path, n_ctx=window, n_batch=window,
              logits_all=True, n_threads=threads, verbose=False)
  out = []
  for tokens in token_lists:
    tokens = [int(t) for t in tokens]
    lp = np.zeros(max(len(tokens) - 1, 0), np.float64)
    for begin, first, last in perplexity.window_plan(len(tokens), window,
                                                     stride):
      ids = tokens[begin:begin + window]
      llm.reset()
      llm.eval(ids)
      logits = np.asarray(llm.scores[:len(ids)], np.float64)
      logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)
                    ) + logits.max(-1)
      for pos in range(first, last + 1):  # target pos, predicted at pos - 1
        row = pos - 1 - begin
        lp[pos - 1] = logits[row, tokens[pos]] - logz[row]
    out.append(lp)
  return out


def compare(pre, gguf_path: str, docs, window: int = 0,
            threads: int = 2) -> dict:
  window = window or pre.model_cfg.seq_len
  tokens = [perplexity.document_tokens(pre.tokenizer, d) for d in docs]
  ours, _ = perplexity.target_logprobs(pre, tokens, window, window)
  theirs = llama_cpp_logprobs(gguf_path, tokens, window, window, threads)
  a, b = np.concatenate(ours), np.concatenate(theirs)
  diff = np.abs(a - b)
  ppl_ours, ppl_theirs = math.exp(-a.mean()), math.exp(-b.mean())
  return {"tokens": int(a.size), "documents": len(docs), "window": window,
          "ppl_bitnet_jax": ppl_ours, "ppl_llama_cpp": ppl_theirs,
          "ppl_ratio": ppl_theirs / ppl_ours,
          "logprob_abs_diff_median": float(np.median(diff)),
          "logprob_abs_diff_p99": float(np.quantile(diff, 0.99)),
          "logprob_abs_diff_max": float(diff.max())}


def define_flags() -> None:
  cli.define_run_flags("The trained run that was exported.", config=False)
  document_flags.define_document_flags()
  flags.DEFINE_string("gguf", None, "Its GGUF file (export --format=gguf).")
  flags.DEFINE_integer("threads", 2, "llama.cpp threads.")


def main(argv):
  del argv
  cli.require("workdir", "gguf")
  from bitnet_jax.inference import pretrained
  pre = pretrained.load(FLAGS.workdir, step=cli.checkpoint_step())
  docs, desc = perplexity.corpus_documents(pre, document_flags.documents())
  r = compare(pre, FLAGS.gguf, docs, threads=FLAGS.threads)
  print(f"{r['tokens']:,} tokens of {r['documents']} documents ({desc}), "
        f"windows of {r['window']}")
  print(f"  perplexity: bitnet_jax {r['ppl_bitnet_jax']:.4f}, llama.cpp "
        f"{r['ppl_llama_cpp']:.4f} (ratio {r['ppl_ratio']:.4f})")
  print(f"  |log p| difference per token: median "
        f"{r['logprob_abs_diff_median']:.2e}, p99 "
        f"{r['logprob_abs_diff_p99']:.2e}, max {r['logprob_abs_diff_max']:.2e}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
