"""A TFDS builder for local text corpora (array_record; no TensorFlow needed).

Turns your own files into a TFDS dataset that the `tfds` data source reads
with `tfds.data_source`, exactly like a prepared public corpus:

  python -m bitnet_jax.data.tfds_corpus --paths='corpus/*.txt' --data_dir=/data/tfds \
      --name=mycorpus [--doc_split=blank_line] [--eval_fraction=0.01]

then train with
  --config.data.source=tfds --config.data.tfds_name=local_text_corpus/mycorpus \
  --config.data.tfds_data_dir=/data/tfds

Splits `train` and `validation` use the same content-hash rule as the local
sources (corpus.split_train_eval); documents keep their file order.
"""
from __future__ import annotations

from absl import flags
import ml_collections
import tensorflow_datasets as tfds

from bitnet_jax import cli
from bitnet_jax.data import corpus


class LocalTextCorpus(tfds.core.GeneratorBasedBuilder):
  """Documents from local text or JSON-lines files; feature `text`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, name: str = "default", paths: str = "",
               source: str = "text", doc_split: str = "blank_line",
               text_field: str = "text", eval_fraction: float = 0.01, **kwargs):
    self._corpus_args = ml_collections.ConfigDict(dict(
        source=source, paths=paths, doc_split=doc_split, text_field=text_field,
        eval_fraction=eval_fraction, max_docs=0))
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="A local text corpus built by bitnet_jax.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._corpus_args.paths:
      raise ValueError("LocalTextCorpus needs paths= to build the dataset")
    split = corpus.load_corpus(self._corpus_args)
    return {"train": self._generate_examples(split.train),
            "validation": self._generate_examples(split.eval)}

  def _generate_examples(self, docs):
    for i, doc in enumerate(docs):
      yield i, {"text": doc}


def build(paths: str, data_dir: str, name: str = "default", *,
          source: str = "text", doc_split: str = "blank_line",
          text_field: str = "text", eval_fraction: float = 0.01) -> str:
  """Build the dataset; returns the tfds name to put in config.data.tfds_name."""
  builder = LocalTextCorpus(name=name, paths=paths, source=source,
                            doc_split=doc_split, text_field=text_field,
                            eval_fraction=eval_fraction, data_dir=data_dir,
                            file_format="array_record")
  builder.download_and_prepare()
  return f"local_text_corpus/{name}"


FLAGS = flags.FLAGS
flags.DEFINE_string("paths", None, "Comma-separated files or globs.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir to write into.")
flags.DEFINE_string("name", "default", "Builder config name of this corpus.")
flags.DEFINE_enum("source", "text", ["text", "jsonl"], "File format.")
flags.DEFINE_enum("doc_split", "blank_line", ["blank_line", "file"],
                  "text: documents separated by blank lines, or one per file.")
flags.DEFINE_string("text_field", "text", "jsonl: the field holding the text.")
flags.DEFINE_float("eval_fraction", 0.01, "Share of documents held out.")


def main(argv):
  del argv
  tfds.disable_progress_bar()
  name = build(FLAGS.paths, FLAGS.data_dir, FLAGS.name, source=FLAGS.source,
               doc_split=FLAGS.doc_split, text_field=FLAGS.text_field,
               eval_fraction=FLAGS.eval_fraction)
  print(f"built {name} in {FLAGS.data_dir}: train with "
        f"--config.data.source=tfds --config.data.tfds_name={name} "
        f"--config.data.tfds_data_dir={FLAGS.data_dir}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["paths", "data_dir"])
  cli.run(main)
