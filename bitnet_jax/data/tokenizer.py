"""Tokenizers: load a sentencepiece .model (or a Hugging Face tokenizer.json:
json_tokenizer.py, chosen by `load` from the file name), or train one into
the workdir.

`Tokenizer` is a picklable wrapper (grain workers run in other processes): it
pickles the serialized model and loads the processor lazily on first use.
BOS / EOS / PAD ids come from the model, never from constants.

Trained tokenizers (`train_tokenizer`) are byte-level-safe BPE models that
round-trip text exactly: identity normalisation, whitespace kept (runs of
spaces are pieces), newline as its own piece, byte fallback for anything the
vocabulary lacks. `get_tokenizer` caches the trained model as
`<workdir>/tokenizer.model` so a restart reuses it.
"""
from __future__ import annotations

import io
import logging
import os
import re
import time
from typing import Callable, Iterable, Sequence

from etils import epath
import sentencepiece as spm

from bitnet_jax import rundir, storage
from bitnet_jax.errors import InputError, MissingInput
from bitnet_jax.progress import Progress, format_seconds


class Tokenizer:
  """A sentencepiece model; cheap to pickle (ships the model bytes)."""
  filename = rundir.TOKENIZER

  def __init__(self, model_proto: bytes, source: str = "<bytes>"):
    self._proto = bytes(model_proto)
    self.source = source
    self._sp = None
    self.sp  # validate now, not in a worker process later

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    p = epath.Path(path)
    if not p.exists():
      raise MissingInput(f"tokenizer model not found: {p}")
    return cls(p.read_bytes(), source=str(p))

  @property
  def sp(self) -> spm.SentencePieceProcessor:
    if self._sp is None:
      sp = spm.SentencePieceProcessor()
      try:
        sp.LoadFromSerializedProto(self._proto)
      except Exception as e:  # sentencepiece raises RuntimeError / OSError
        raise InputError(f"{self.source} is not a sentencepiece model: {e}") from e
      self._sp = sp
    return self._sp

  def __getstate__(self):
    return {"proto": self._proto, "source": self.source}

  def __setstate__(self, state):
    self._proto, self.source, self._sp = state["proto"], state["source"], None

  @property
  def model_proto(self) -> bytes:
    """The serialized sentencepiece model (its pieces, scores and types)."""
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self.sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self.sp.pad_id()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def save(self, path: str | os.PathLike) -> None:
    """Write the model atomically (a reader never sees a partial file)."""
    storage.write_atomic(path, self._proto)


def load(path: str | os.PathLike):
  """The tokenizer in a file: a Hugging Face tokenizer.json (any *.json) or
  a sentencepiece model."""
  if os.fspath(path).endswith(".json"):
    from bitnet_jax.data.json_tokenizer import JsonTokenizer
    return JsonTokenizer.load(path)
  return Tokenizer.load(path)


def train_tokenizer(docs: Iterable[str], vocab_size: int,
                    num_threads: int = 2) -> Tokenizer:
  """Train an exact-round-trip BPE model (ids: pad 0, unk 1, bos 2, eos 3).
  sentencepiece reports nothing while it trains: the documents it reads are
  counted (with a rate once it takes long), then the time it took."""
  buf = io.BytesIO()
  total = len(docs) if hasattr(docs, "__len__") else 0
  progress = Progress(total or None, "documents", "reading for the tokenizer")
  read = {"docs": 0, "chars": 0}

  def counted():
    for doc in docs:
      read["docs"] += 1
      read["chars"] += len(doc)
      progress.advance()
      yield doc
  start = time.monotonic()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=counted(), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"], max_sentence_length=1 << 20,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=num_threads,
        hard_vocab_limit=True, minloglevel=2)
  except RuntimeError as e:
    most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a "
                     r"value <= (\d+)", str(e))
    least = re.search(r"Vocabulary size is smaller than required_chars\. "
                      r"\d+ vs (\d+)", str(e))
    if least:
      raise InputError(
          f"the corpus has {least.group(1)} distinct characters and "
          "special pieces, more than model.vocab_size="
          f"{vocab_size}: set --config.model.vocab_size={least.group(1)} "
          "(or more)") from None
    if most:
      raise InputError(
          f"the corpus supports at most {most.group(1)} tokenizer pieces, but "
          f"model.vocab_size is {vocab_size}: set --config.model.vocab_size="
          f"{most.group(1)} (or less), or give it more text") from None
    raise InputError(f"training a {vocab_size}-piece tokenizer failed (too "
                     f"little text for that vocabulary?): {e}") from e
  logging.info("trained the tokenizer on %s documents (%.1f M characters) "
               "in %s", f"{read['docs']:,}", read["chars"] / 1e6,
               format_seconds(time.monotonic() - start))
  return Tokenizer(buf.getvalue(), source="<trained>")


def get_tokenizer(path: str, workdir: str | None, vocab_size: int,
                  sample_docs: Callable[[], Iterable[str]],
                  is_leader: bool = True,
                  barrier: Callable[[str], None] = lambda name: None
                  ) -> Tokenizer:
  """The tokenizer a run uses.

  Args:
    path: a .model file; "" trains one (cached in the workdir).
    workdir: where the trained model is cached.
    vocab_size: the model's vocabulary; a tokenizer must not exceed it, and a
      trained one gets exactly this many pieces.
    sample_docs: documents to train on (called only when training).
    is_leader / barrier: in multi-process runs only the leader trains; the
      others wait at the barrier, then read the cached file.
  """
  if path:
    tok = load(path)
  else:
    if not workdir:
      raise InputError("no tokenizer path and no workdir to cache one in")
    cache = rundir.RunDir(workdir).own_tokenizer
    if is_leader and not cache.exists():
      logging.info("training a %d-piece tokenizer into %s", vocab_size, cache)
      train_tokenizer(sample_docs(), vocab_size).save(cache)
    barrier("bitnet_jax_tokenizer")
    tok = load(cache)
    if isinstance(tok, Tokenizer) and tok.vocab_size != vocab_size:
      raise InputError(
          f"{cache} was trained with {tok.vocab_size} pieces but "
          f"model.vocab_size is {vocab_size}: use a new workdir or delete it")
    logging.info("tokenizer: %s (%d pieces)", cache, tok.vocab_size)
  if tok.vocab_size > vocab_size:
    raise InputError(
        f"tokenizer {tok.source} has {tok.vocab_size} pieces but "
        f"model.vocab_size is {vocab_size}; raise --config.model.vocab_size")
  if tok.bos_id < 0 or tok.eos_id < 0:
    raise InputError(f"tokenizer {tok.source} defines no BOS/EOS pieces")
  return tok
