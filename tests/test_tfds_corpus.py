"""The local TFDS builder writes array_record files tfds.data_source reads back."""
import collections
import os

import pytest

from bitnet_jax import defaults
from bitnet_jax.data import corpus
from bitnet_jax.data import pipeline as data
from bitnet_jax.data import tfds_corpus


@pytest.fixture(scope="module")
def built(tmp_path_factory, documents):
  root = tmp_path_factory.mktemp("tfds")
  text = root / "corpus.txt"
  text.write_text("\n\n".join(d.replace("\n", " ") for d in documents))
  name = tfds_corpus.build(str(text), str(root / "data"), "unit", eval_fraction=0.1)
  return name, str(root / "data"), str(text)


def test_builder_round_trip(built):
  name, data_dir, text = built
  assert name == "local_text_corpus/unit"
  files = os.listdir(os.path.join(data_dir, "local_text_corpus", "unit", "1.0.0"))
  assert any(".array_record" in f for f in files)
  cfg = defaults.base_config().data
  cfg.update(source="text", paths=text, eval_fraction=0.1)
  local = corpus.load_corpus(cfg)
  cfg.update(source="tfds", tfds_name=name, tfds_data_dir=data_dir)
  via_tfds = corpus.load_corpus(cfg)
  # The same documents on the same side of the split (TFDS stores its own order).
  assert collections.Counter(via_tfds.train) == collections.Counter(local.train)
  assert collections.Counter(via_tfds.eval) == collections.Counter(local.eval)


def test_training_stream_from_tfds(built, small_tokenizer):
  name, data_dir, _ = built
  cfg = defaults.base_config().data
  cfg.update(source="tfds", tfds_name=name, tfds_data_dir=data_dir, batch_size=2,
             prefetch=0, shuffle_rows=0)
  split = corpus.load_corpus(cfg)
  it = iter(data.train_dataset(split.train, small_tokenizer, cfg, seq_len=15,
                               seed=0))
  batch = next(it)
  assert batch.tokens.shape == (2, 16)
  first = batch.tokens[0]
  assert first[0] == small_tokenizer.bos_id  # rows start at a document
  text = small_tokenizer.decode(first[1:])
  assert any(doc.startswith(text) for doc in split.train)


def test_unknown_field_is_named(built):
  name, data_dir, _ = built
  with pytest.raises(ValueError, match="no field 'body'"):
    corpus.TfdsText(name, "train", data_dir, "body")
