"""Messages that send the user the right way: a binary corpus file and a
vocabulary larger than the corpus supports are errors naming the cause."""
import pytest

from bitnet_jax.data import corpus, tokenizer
from bitnet_jax.errors import InputError


def test_a_binary_file_is_not_a_corpus(tmp_path):
  binary = tmp_path / "lib.so"
  binary.write_bytes(bytes(range(256)) * 64)
  with pytest.raises(InputError, match=r"lib.so is not a text file .*NUL"):
    corpus.read_text(str(binary))
  mostly_text = tmp_path / "notes.txt"
  mostly_text.write_bytes(b"plain words " * 500 + b"\xff\xfe")
  assert corpus.read_text(str(mostly_text)).startswith("plain words")


def test_a_vocabulary_the_corpus_cannot_fill_names_the_field():
  docs = ["a small corpus of a few words, said twice."] * 20
  with pytest.raises(InputError, match=r"the corpus supports at most \d+ "
                     r"tokenizer pieces, but model.vocab_size is 4096: set "
                     r"--config.model.vocab_size=\d+"):
    tokenizer.train_tokenizer(docs, 4096)
