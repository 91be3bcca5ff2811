"""The documents a command scores, chosen on its command line: the flags
--<prefix>source, --<prefix>split, --<prefix>paths, ... and the
`perplexity.Documents` they select (evaluate, analyze, ptq's calibration,
the GGUF check)."""
from __future__ import annotations

import dataclasses

from absl import flags

from bitnet_jax.evaluation.perplexity import Documents

FLAGS = flags.FLAGS
DOCUMENT_SOURCES = ("heldout", "text", "jsonl", "tfds")  # heldout: the run's split
# (run_config.SOURCES are the training data's: stdlib, text, jsonl, tfds)


def define_document_flags(prefix: str = "", *, sources=DOCUMENT_SOURCES,
                          default_split: str = "", split_help: str = "",
                          tfds: bool = True, max_docs: bool = True) -> None:
  """The document selection of `perplexity.Documents`, as --<prefix>source,
  --<prefix>split, --<prefix>paths, ..."""
  p = prefix
  flags.DEFINE_enum(p + "source", sources[0], list(sources),
                    "heldout: the run's own data config; or other files / TFDS.")
  flags.DEFINE_string(p + "split", default_split, split_help or
                      "text/jsonl: all (default), eval or train (the run's "
                      "hash split); heldout: eval (default) or train; tfds: "
                      "the split name.")
  flags.DEFINE_string(p + "paths", "", "text/jsonl files or globs.")
  flags.DEFINE_string(p + "text_field", "text", "jsonl/tfds text field.")
  flags.DEFINE_enum(p + "doc_split", "blank_line", ["blank_line", "file"],
                    "text: documents split at blank lines or one per file.")
  if tfds:
    flags.DEFINE_string(p + "tfds_name", "", "tfds dataset name.")
    flags.DEFINE_string(p + "tfds_data_dir", "", "tfds data_dir.")
  if max_docs:
    flags.DEFINE_integer(p + "max_docs", 0, "Read at most this many "
                         "documents (0: all).")


def documents(prefix: str = ""):
  """The `perplexity.Documents` the document flags under `prefix` select."""
  values = {}
  for field in dataclasses.fields(Documents):
    name = prefix + field.name
    if name in FLAGS:
      values[field.name] = FLAGS[name].value
  return Documents(**values)
