"""Test setup: 8 host CPU devices, set before jax is imported anywhere."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402  (must come after the environment is set)

assert jax.device_count() == 8, (
    f"tests expect 8 forced host devices, got {jax.devices()}; was jax imported "
    "before tests/conftest.py ran?")


# ---------------------------------------------------------------------------
# Shared data fixtures: tests make their own text, nothing is downloaded.

import numpy as np  # noqa: E402
import pytest  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her it "
         "an were which are this be or had not but what all when we there can "
         "one their has more will if no out so said who them some could him "
         "into time only new two may then do first any my now such like our "
         "over man me even most made after also did many before must through "
         "back years where much your way well down should because each just "
         "those people how too little state good very make world still own "
         "see men work long get here between both life being under never day "
         "same another know while last might us great old year off come since "
         "against go came right used take three").split()


def make_documents(n_docs, seed=0, min_words=5, max_words=120):
  """Deterministic pseudo-English documents with punctuation and unicode."""
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(n_docs):
    n = int(rng.integers(min_words, max_words))
    words = list(rng.choice(WORDS, n))
    for j in range(0, n, 9):
      words[j] = words[j].capitalize()
    text = " ".join(words)
    text = text.replace(" of ", ", of ").replace(" then ", ".\nThen ")
    docs.append(f"Document {i}: {text}. Café № {i % 7}.")
  return docs


@pytest.fixture(scope="session")
def documents():
  return make_documents(300)


@pytest.fixture(scope="session")
def small_tokenizer(documents):
  from bitnet_jax.tokenizer import train_tokenizer
  return train_tokenizer(documents, vocab_size=400, num_threads=1)
