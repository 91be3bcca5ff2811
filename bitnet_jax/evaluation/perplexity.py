"""Perplexity of a trained run: documents scored in windows of the context.

Each document is [BOS] + tokens + [EOS]; its targets (every token after BOS)
are scored in windows of `window` inputs starting every `stride` tokens; a
target is scored by the first window that reaches it, with the context that
window holds, so every token counts exactly once.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from bitnet_jax.errors import ConfigError, InputError
from bitnet_jax.progress import Progress


def window_plan(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
  """(begin, first, last) per window for an n-token document: inputs
  tokens[begin : begin + window], scored targets at positions first..last."""
  if not 0 < stride <= window:
    raise ConfigError(f"need 0 < stride <= window, got {stride} and {window}")
  plan, scored, begin = [], 0, 0
  while scored < n - 1:
    last = min(begin + window, n - 1)
    if last > scored:
      plan.append((begin, scored + 1, last))
      scored = last
    begin += stride
  return plan


def target_logprobs(pre, token_lists: Sequence[Sequence[int]], window: int,
                    stride: int, batch_size: int = 8):
  """log p(token t | its window's context) for t = 1 .. n-1 of every list,
  and whether each was the greedy choice. Returns two lists of arrays."""
  rows, weights, owners = [], [], []
  for d, tokens in enumerate(token_lists):
    tokens = np.asarray(tokens, np.int32)
    for begin, first, last in window_plan(len(tokens), window, stride):
      row = np.zeros(window + 1, np.int32)
      piece = tokens[begin:begin + window + 1]
      row[:len(piece)] = piece
      pos = begin + 1 + np.arange(window)  # doc position of each target
      rows.append(row)
      weights.append((pos >= first) & (pos <= last))
      owners.append((d, first, last))
  out_lp = [np.zeros(max(len(t) - 1, 0), np.float64) for t in token_lists]
  out_greedy = [np.zeros(max(len(t) - 1, 0), bool) for t in token_lists]
  progress = Progress(len(rows), "windows", "scoring")
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    pad = batch_size - len(chunk)
    batch = np.stack(chunk + [np.zeros_like(rows[0])] * pad)
    lp, greedy = pre.scorer(pre.params, batch)
    lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
    for i, (d, first, last) in enumerate(owners[start:start + len(chunk)]):
      w = weights[start + i]
      out_lp[d][first - 1:last] = lp[i][w]
      out_greedy[d][first - 1:last] = greedy[i][w]
    progress.advance(len(chunk))
  return out_lp, out_greedy


def document_tokens(tokenizer, doc: str) -> list[int]:
  return [tokenizer.bos_id, *tokenizer.encode(doc), tokenizer.eos_id]


def token_rows(tokenizer, docs: Sequence[str], rows: int, width: int
               ) -> np.ndarray:
  """Up to `rows` rows of `width` tokens cut without overlap from the stream
  [BOS] doc [EOS] [BOS] doc [EOS] ... (only as many documents as needed are
  tokenized)."""
  stream: list[int] = []
  for doc in docs:
    stream += document_tokens(tokenizer, doc)
    if len(stream) >= rows * width:
      break
  n = min(rows, len(stream) // width)
  if n == 0:
    raise InputError(f"the text has {len(stream)} tokens, fewer than one "
                     f"sequence of {width}")
  return np.asarray(stream[:n * width], np.int32).reshape(n, width)


def perplexity(pre, docs: Sequence[str], window: int = 0, stride: int = 0,
               batch_size: int = 8) -> dict:
  window = window or pre.model_cfg.seq_len
  stride = stride or window
  tokens = [document_tokens(pre.tokenizer, d) for d in docs]
  lps, _ = target_logprobs(pre, tokens, window, stride, batch_size)
  total = -sum(float(lp.sum()) for lp in lps)
  count = sum(len(lp) for lp in lps)
  if count == 0:
    raise InputError("no tokens to score")
  nll = total / count
  return {"nll": nll, "ppl": math.exp(nll), "tokens": count,
          "documents": len(docs), "window": window, "stride": stride}


@dataclasses.dataclass(frozen=True)
class Documents:
  """Which documents to score: the run's own held-out split (source
  "heldout"), or another text / jsonl / tfds corpus and split."""
  source: str = "heldout"
  paths: str = ""
  split: str = ""          # "" = all for a text/jsonl file, else eval
  text_field: str = "text"
  doc_split: str = "blank_line"
  tfds_name: str = ""
  tfds_data_dir: str = ""
  max_docs: int = 0        # 0 = every document


def corpus_documents(pre, select: Documents) -> tuple[list[str], str]:
  """(documents, description) of `select`, read with the run's data config."""
  from bitnet_jax.data import corpus
  data = pre.run.data
  if select.source != "heldout":
    data = data.replace(source=select.source, paths=select.paths,
                        text_field=select.text_field,
                        doc_split=select.doc_split, tfds_name=select.tfds_name,
                        tfds_data_dir=select.tfds_data_dir, max_docs=0)
  # Default split: a file given by path means the whole file; the run's own
  # data means its held-out documents; TFDS its eval split.
  which = select.split or ("all" if select.source in ("text", "jsonl")
                           else "eval")
  if data.source == "tfds":
    if which not in ("eval", "train"):
      data = data.replace(tfds_eval_split=which)
    split = corpus.load_corpus(data)
    docs = split.train if which == "train" else split.eval
  else:
    split = corpus.load_corpus(data)
    docs = {"eval": split.eval, "train": split.train,
            "all": list(split.train) + list(split.eval)}.get(which)
    if docs is None:
      raise ConfigError(f"--split must be all, eval or train for {data.source}")
  docs = list(docs[:select.max_docs] if select.max_docs else docs)
  return docs, f"{split.description}, split {which}"
