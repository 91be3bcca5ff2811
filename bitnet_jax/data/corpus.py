"""Document sources and the held-out split (config.data.source chooses).

  stdlib  the embedded default: the Python standard library's own .py files
          (site-packages excluded), found at run time; one document per file.
  text    text files or globs (comma-separated); documents separated by blank
          lines (doc_split=blank_line) or one per file (doc_split=file).
  jsonl   JSON-lines files or globs; one document per line, in `text_field`.
  tfds    any TFDS dataset readable by `tfds.data_source` (array_record, no
          TensorFlow needed), e.g. c4/en:3.1.0 in a bucket, or a local corpus
          built with `python -m bitnet_jax.data.tfds_corpus`.

Local sources are read into memory (for corpora larger than RAM, build a TFDS
dataset). Bytes that are not UTF-8 are decoded with U+FFFD replacement and a
warning names the file. Held-out documents (non-TFDS) are chosen by a hash of
their content: deterministic, independent of the seed, and duplicates always
land on the same side, so train and validation never overlap.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import sysconfig
from typing import Sequence

from etils import epath

from bitnet_jax import storage
from bitnet_jax.errors import ConfigError, InputError, MissingField, MissingInput
from bitnet_jax.run_config import DataConfig

_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclasses.dataclass
class Corpus:
  train: Sequence[str]
  eval: Sequence[str]
  description: str


class TfdsText:
  """Random-access view of one text field of a TFDS split (picklable)."""

  def __init__(self, name: str, split: str, data_dir: str, field: str):
    self.name, self.split, self.data_dir, self.field = name, split, data_dir, field
    self._source = None
    self._open()

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # heavy import, only for this source
      try:
        self._source = tfds.data_source(self.name, split=self.split,
                                        data_dir=self.data_dir or None)
      except Exception as e:  # DatasetNotFoundError, split errors, bad dirs
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise InputError(
            f"TFDS dataset {self.name!r} split {self.split!r} (data_dir="
            f"{self.data_dir or 'default'}) cannot be read: {first}") from None
      if len(self._source) and self.field not in self._source[0]:
        raise InputError(
            f"TFDS dataset {self.name!r} has no field {self.field!r}; fields: "
            f"{sorted(self._source[0])}")
    return self._source

  def __len__(self):
    return len(self._open())

  def __getitem__(self, index):
    value = self._open()[index][self.field]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_source"}

  def __setstate__(self, state):
    self.__dict__.update(state, _source=None)


def expand_paths(spec: str) -> list[str]:
  """Comma-separated files or globs -> sorted file list; clear errors."""
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if not parts:
    raise ConfigError("data.paths is empty: give files or globs, comma-separated")
  files = []
  for part in parts:
    if glob.has_magic(part):
      matched = (remote_glob(part) if storage.is_remote(part) else
                 sorted(f for f in glob.glob(part, recursive=True)
                        if os.path.isfile(f)))
      if not matched:
        raise MissingInput(f"data.paths: glob {part!r} matched no files")
      files.extend(matched)
    elif epath.Path(part).is_dir():
      raise InputError(f"data.paths: {part!r} is a directory; use a glob "
                              f"such as {os.path.join(part, '*.txt')!r}")
    elif not epath.Path(part).exists():
      raise MissingInput(f"data.paths: no such file: {part!r}")
    else:
      files.append(part)
  return files


def remote_glob(pattern: str) -> list[str]:
  """Files matching a glob on an object store (gs://B/dir/*.txt; one level
  per `*`: object stores list recursively only by prefix)."""
  head, *rest = pattern.split("://", 1)[1].split("/")
  parts = [head] + rest
  fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
  base = epath.Path(pattern.split("://")[0] + "://" + "/".join(parts[:fixed]))
  return sorted(str(f) for f in base.glob("/".join(parts[fixed:]))
                if f.is_file())


# A file is not text when it holds NUL bytes or when more than this share of
# its characters are not UTF-8 (Latin-1 text with some accents only warns).
MAX_UNDECODABLE = 0.3


def read_text(path: str, warn: bool = True) -> str:
  """A corpus file as text; a binary file (NUL bytes, or mostly not UTF-8)
  is an error naming it, a few bad bytes a warning (warn=False: silent)."""
  data = epath.Path(path).read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    text = data.decode("utf-8", "replace")
    bad = text.count("\ufffd") / max(len(text), 1)
    if warn and (b"\x00" in data or bad > MAX_UNDECODABLE):
      raise InputError(f"{path} is not a text file ({100 * bad:.0f}% of its "
                       "characters are not UTF-8"
                       + (", and it holds NUL bytes" if b"\x00" in data else "")
                       + "): remove it from data.paths") from None
    if warn:
      logging.warning("%s is not valid UTF-8 (%s); decoding with replacement "
                      "characters", path, e.reason)
    return text


def stdlib_files() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"),
                                      recursive=True)
                 if "site-packages" not in f and "dist-packages" not in f)
  if not files:
    raise MissingInput(f"no Python standard library sources under {root}")
  return files


def split_documents(text: str, doc_split: str) -> list[str]:
  if doc_split == "file":
    return [text] if text.strip() else []
  if doc_split == "blank_line":
    return [d.strip("\n") for d in _BLANK_LINES.split(text) if d.strip()]
  raise ConfigError(f"data.doc_split must be blank_line or file, got {doc_split!r}")


def read_jsonl(path: str, field: str) -> list[str]:
  docs = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      line = raw.decode("utf-8", "replace").strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{path}:{lineno}: not JSON ({e.msg})") from None
      if not isinstance(record, dict) or field not in record:
        raise MissingField(f"{path}:{lineno}: no field {field!r} (data.text_field); "
                       f"keys: {sorted(record) if isinstance(record, dict) else type(record).__name__}")
      if not isinstance(record[field], str):
        raise InputError(f"{path}:{lineno}: field {field!r} is not a string")
      if record[field].strip():
        docs.append(record[field])
  return docs


def is_held_out(doc: str, fraction: float) -> bool:
  digest = hashlib.blake2b(doc.encode("utf-8", "replace"), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0 ** 64 < fraction


def split_train_eval(docs: list[str], fraction: float
                     ) -> tuple[list[str], list[str]]:
  if not 0.0 <= fraction < 1.0:
    raise ConfigError(f"data.eval_fraction must be in [0, 1), got {fraction}")
  train, held = [], []
  for d in docs:
    (held if is_held_out(d, fraction) else train).append(d)
  return train, held


def load_local_documents(data: DataConfig) -> tuple[list[str], str]:
  """All documents of a stdlib/text/jsonl source, in a deterministic order."""
  if data.source == "stdlib":
    files = stdlib_files()
    texts = [read_text(f, warn=False) for f in files]
    docs = [t for t in texts if t.strip()]
    desc = f"Python stdlib ({len(files)} files under {os.path.dirname(files[0])})"
  elif data.source == "text":
    files = expand_paths(data.paths)
    docs = []
    for f in files:
      docs.extend(split_documents(read_text(f), data.doc_split))
    desc = f"text files ({len(files)}: {data.paths})"
  elif data.source == "jsonl":
    files = expand_paths(data.paths)
    docs = []
    for f in files:
      docs.extend(read_jsonl(f, data.text_field))
    desc = f"JSON-lines ({len(files)}: {data.paths}, field {data.text_field!r})"
  else:  # RunConfig checked data.source; tfds is not a local source
    raise ValueError(f"data.source {data.source!r} is not a local source")
  if not docs:
    raise InputError(f"the corpus has no documents: {desc}")
  if data.max_docs:
    docs = docs[:data.max_docs]
  return docs, desc


def load_corpus(data: DataConfig) -> Corpus:
  """The train and held-out documents that config.data describes."""
  if data.source == "tfds":
    train = TfdsText(data.tfds_name, data.tfds_train_split, data.tfds_data_dir,
                     data.text_field)
    held = TfdsText(data.tfds_name, data.tfds_eval_split, data.tfds_data_dir,
                    data.text_field)
    if len(train) == 0:
      raise InputError(f"TFDS {data.tfds_name} split {data.tfds_train_split} is empty")
    return Corpus(train, held, f"TFDS {data.tfds_name} ({len(train)} train / "
                  f"{len(held)} held-out documents)")
  docs, desc = load_local_documents(data)
  train, held = split_train_eval(docs, data.eval_fraction)
  if data.eval_fraction > 0 and not held and train:
    # A tiny corpus: hold out the document with the smallest hash (the first
    # the hash rule would pick), with all of its duplicates.
    first = min(train, key=lambda d: hashlib.blake2b(
        d.encode("utf-8", "replace"), digest_size=8).digest())
    held = [d for d in train if d == first]
    train = [d for d in train if d != first]
  if not train:
    raise InputError(f"no training documents left after holding out "
                     f"{data.eval_fraction:.0%} of {desc}")
  return Corpus(train, held, f"{desc}: {len(train)} train / {len(held)} "
                f"held-out documents")
