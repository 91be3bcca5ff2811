"""Test setup: 8 host CPU devices, set before jax is imported anywhere."""
import os
import shutil
import tempfile

# Tests compile with LLVM at -O0 and with XLA:CPU's loop emitters instead of
# its MLIR fusion emitters: the tiny test programs compile ~2.5x faster at
# -O0 and ~3x faster again without the fusion emitters (the SMALL v2 train
# step: 1.8 s -> 0.6 s), and run faster too (its step: 115 ms -> 68 ms). The
# sharding, collectives and dots the compiled-program tests read are the
# same; XLA:CPU fuses elementwise ops differently, so float32 results may
# differ in the last bits (the tests compare programs compiled under the
# same flags, or float64 references with tolerances).
# Subprocesses get the same flags (without the device count) via
# subprocess_env(); benchmarks are never timed under them (bitnet_jax.bench is).
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                  "--xla_cpu_use_fusion_emitters=false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent compilation cache per test run, shared by the xdist workers
# and the CLIs the tests start (they inherit the variable): the same small
# program compiled by several tests and their subprocesses compiles once. It
# starts empty on every run and the process that made it removes it at the
# end; a cached executable is keyed on the whole HLO, flags and versions, so
# it can never stand in for a different program. A JAX_COMPILATION_CACHE_DIR
# set by the user is used as it is and kept.
_MADE_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _MADE_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      tempfile.gettempdir(), f"bitnet_jax_test_xla_{os.getpid()}")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

os.environ["JAX_PLATFORMS"] = "cpu"
for _flag in ("--xla_force_host_platform_device_count=8", *TEST_XLA_FLAGS.split()):
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


def pytest_sessionfinish(session):
  if _MADE_CACHE:  # the xdist controller (or a run without workers)
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The longest tests (a few minutes each on 2 cores), started first.
LONGEST = ("test_quick_study_end_to_end_and_resume",
           "test_paper_400m_compiled_for_a_v5p_cube")


def pytest_collection_modifyitems(items):
  """Longest first, then the other slow tests, then the rest: with two xdist
  workers stealing work (pytest.ini: --dist worksteal) the suite then ends
  near half its total time instead of waiting on a long test started last."""
  def rank(item):
    if item.name in LONGEST:
      return LONGEST.index(item.name)
    return len(LONGEST) + (item.get_closest_marker("slow") is None)
  items.sort(key=rank)


def subprocess_env(**extra):
  """Environment of a CLI run by a test: one CPU device, the test compile flags."""
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
              XLA_FLAGS=TEST_XLA_FLAGS, **extra)

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
  from bitnet_jax.data.tokenizer import train_tokenizer
  return train_tokenizer(documents, vocab_size=400, num_threads=1)


SMALL = {  # a few-second model on the tests' own text
    "model.vocab_size": 320, "model.d_model": 32, "model.d_ff": 64,
    "model.num_heads": 2, "model.num_layers": 2, "model.seq_len": 32,
    "data.batch_size": 8, "data.source": "text", "data.tokenizer_train_docs": 300,
    "data.eval_fraction": 0.1, "data.shuffle_rows": 64, "opt.warmup_steps": 5,
    "opt.lr": 3e-3, "opt.lr_stage2": 2e-3, "train.num_steps": 30,
    "train.stop_step": -1, "train.stop_fraction": 1.0, "train.log_every": 1,
    "train.ckpt_every": 10,
    "train.eval_batches": 2,
}


def small_run_config(corpus_file, **overrides):
  """configs/tiny.py shrunk to SMALL and pointed at `corpus_file`."""
  from bitnet_jax import defaults
  c = defaults.tiny_config()
  settings = dict(SMALL, **{"data.paths": corpus_file})
  settings.update(overrides)
  for key, value in settings.items():
    group, field = key.split(".")
    c[group][field] = value
  return c


def shared(tmp_path_factory, name: str, make):
  """`make(path)` once per test session, by whichever xdist worker asks
  first; the other waits on a lock and reuses it (every worker training the
  same fixture runs cost the suite about a minute). Fixture runs are read,
  or copied before a test changes them."""
  import filelock
  base = tmp_path_factory.getbasetemp()
  root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
  root.mkdir(exist_ok=True)
  path, done = root / name, root / f"{name}.done"
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not done.exists():
      if path.is_dir():  # a half-made one from a failed try
        shutil.rmtree(path)
      make(path)
      done.write_text("ok")
  return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
  return str(shared(tmp_path_factory, "corpus.txt", lambda p: p.write_text(
      "\n\n".join(make_documents(400, seed=3)))))


def shared_run(tmp_path_factory, name: str, config) -> str:
  from bitnet_jax.training import trainer
  return str(shared(tmp_path_factory, name,
                    lambda p: trainer.train(config, str(p))))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus_file):
  """A small v2 (a8) run trained for 24 steps; returns its workdir."""
  return shared_run(tmp_path_factory, "v2", small_run_config(
      corpus_file, **{"train.stop_step": 24}))


@pytest.fixture(scope="session")
def b158_run(tmp_path_factory, corpus_file):
  """A small BitNet b1.58 (a8) run trained for 10 steps; returns its workdir."""
  return shared_run(tmp_path_factory, "b158", small_run_config(corpus_file, **{
      "model.variant": "b1.58", "train.stop_step": 10}))


@pytest.fixture(scope="session")
def gguf_run(tmp_path_factory, corpus_file):
  """A BitNet b1.58 run llama.cpp can run: tied embedding, d_model and d_ff
  multiples of 256 (TQ2_0 blocks), 20 steps; returns its workdir."""
  return shared_run(tmp_path_factory, "gguf", small_run_config(corpus_file, **{
      "model.variant": "b1.58", "model.tie_embeddings": True,
      "model.d_model": 256, "model.d_ff": 512, "model.num_heads": 4,
      "model.num_layers": 1,
      "model.seq_len": 64, "train.num_steps": 20, "train.ckpt_every": 20,
      "train.log_every": 20}))
