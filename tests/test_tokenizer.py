"""Tokenizer: round trips, ids from the model, caching, pickling, bad input."""
import os
import pickle

import pytest
import sentencepiece as spm

from bitnet_jax import rundir
from bitnet_jax.data import tokenizer as tk


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return  x  *  2\n\n\n\tz = 'tab'\n",
    "  leading and trailing spaces  ",
    "Unicode: café, naïve, 中文, emoji 🙂, math ∑∫.",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_encode_round_trip(small_tokenizer, text):
  ids = small_tokenizer.encode(text)
  assert all(0 <= i < small_tokenizer.vocab_size for i in ids)
  assert small_tokenizer.decode(ids) == text


def test_special_ids_and_pickle(small_tokenizer):
  tok = small_tokenizer
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 400)
  clone = pickle.loads(pickle.dumps(tok))
  assert clone._sp is None  # loads lazily in the receiving process
  assert clone.encode(TEXTS[0]) == tok.encode(TEXTS[0])
  assert len(pickle.dumps(tok)) < 100_000


def test_load_llama_style_model_takes_ids_from_the_model(tmp_path, documents):
  # A model with LLaMA's id layout (unk 0, bos 1, eos 2, no pad).
  prefix = str(tmp_path / "llama_style")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(documents), model_prefix=prefix, vocab_size=300,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  tok = tk.Tokenizer.load(prefix + ".model")
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, -1, 300)
  assert tok.decode(tok.encode("the good life")) == "the good life"
  same = tk.get_tokenizer(prefix + ".model", None, 300, lambda: [])
  assert same.encode("state of the world") == tok.encode("state of the world")


def test_trained_tokenizer_is_cached_in_workdir(tmp_path, documents):
  calls = []

  def sample():
    calls.append(1)
    return documents

  first = tk.get_tokenizer("", str(tmp_path), 350, sample)
  cache = tmp_path / rundir.TOKENIZER
  assert cache.exists() and len(calls) == 1
  stamp = os.stat(cache).st_mtime_ns
  second = tk.get_tokenizer("", str(tmp_path), 350, sample)
  assert len(calls) == 1, "the second call reuses the cache"
  assert os.stat(cache).st_mtime_ns == stamp
  assert second.encode(documents[0]) == first.encode(documents[0])
  with pytest.raises(ValueError, match="trained with 350 pieces"):
    tk.get_tokenizer("", str(tmp_path), 360, sample)


def test_bad_tokenizer_inputs(tmp_path, small_tokenizer):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tk.Tokenizer.load(tmp_path / "nope.model")
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"this is not a model")
  with pytest.raises(ValueError, match="not a sentencepiece model"):
    tk.Tokenizer.load(junk)
  path = tmp_path / "small.model"
  small_tokenizer.save(path)
  with pytest.raises(ValueError, match="raise --config.model.vocab_size"):
    tk.get_tokenizer(str(path), None, 100, lambda: [])
  with pytest.raises(ValueError, match=r"the corpus supports at most \d+ "
                     r"tokenizer pieces, but model.vocab_size is 5000"):
    tk.train_tokenizer(["tiny"], vocab_size=5000)
