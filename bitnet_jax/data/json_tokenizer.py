"""Hugging Face `tokenizers` models (a `tokenizer.json`, e.g. the byte-level
BPE of BitNet b1.58 2B4T / LLaMA 3) behind the same interface as the
sentencepiece `Tokenizer`: vocab_size, bos_id, eos_id, pad_id, encode,
decode, save; picklable (ships the JSON text).

BOS / EOS / PAD are the file's special added tokens with the usual names
(`<|begin_of_text|>`, `<s>`, ... ; `<|end_of_text|>`, `</s>`, ...); a file
without a BOS or EOS token is refused. Text is encoded without special
tokens (the data pipeline adds BOS and EOS itself) and decoded without them.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from etils import epath

from bitnet_jax import storage
from bitnet_jax.errors import InputError, MissingInput

FILENAME = "tokenizer.json"
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class JsonTokenizer:
  """A `tokenizers` model; cheap to pickle (ships the JSON text)."""
  filename = FILENAME

  def __init__(self, text: str, source: str = "<json>"):
    self._text = text
    self.source = source
    self._tok = None
    special = {}
    try:
      for t in json.loads(text).get("added_tokens", []):
        if t.get("special"):
          special[t["content"]] = t["id"]
    except (ValueError, AttributeError) as e:
      raise InputError(f"{source} is not a tokenizer.json: {e}") from e
    self._ids = {}
    for role, names in (("bos", BOS_NAMES), ("eos", EOS_NAMES),
                        ("pad", PAD_NAMES)):
      self._ids[role] = next((special[n] for n in names if n in special), None)
    for role in ("bos", "eos"):
      if self._ids[role] is None:
        raise InputError(f"{source}: no special {role.upper()} token (one of "
                         f"{', '.join(BOS_NAMES if role == 'bos' else EOS_NAMES)})")
    self.tok  # validate now, not in a worker process later

  @classmethod
  def load(cls, path: str | os.PathLike) -> "JsonTokenizer":
    p = epath.Path(path)
    if not p.exists():
      raise MissingInput(f"tokenizer not found: {p}")
    return cls(p.read_text(), source=str(p))

  @property
  def tok(self):
    if self._tok is None:
      import tokenizers
      try:
        self._tok = tokenizers.Tokenizer.from_str(self._text)
      except Exception as e:  # tokenizers raises its own Exception types
        raise InputError(f"{self.source} is not a tokenizer.json: {e}") from e
    return self._tok

  def __getstate__(self):
    return {"text": self._text, "source": self.source}

  def __setstate__(self, state):
    self.__init__(state["text"], state["source"])

  @property
  def json_text(self) -> str:
    """The tokenizer.json itself (its model, merges and added tokens)."""
    return self._text

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int:
    return self._ids["bos"]

  @property
  def eos_id(self) -> int:
    return self._ids["eos"]

  @property
  def pad_id(self) -> int:
    return self._ids["pad"] if self._ids["pad"] is not None else self.eos_id

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def save(self, path: str | os.PathLike) -> None:
    """Write the JSON atomically."""
    storage.write_atomic(path, self._text)
