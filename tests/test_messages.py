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


def test_a_vocabulary_below_the_corpus_characters_names_the_field():
  from bitnet_jax.data import tokenizer
  from bitnet_jax.errors import InputError
  docs = ["".join(chr(0x4e00 + i) for i in range(k, k + 40)) for k in range(0, 400, 40)]
  with pytest.raises(InputError, match=r"more than model.vocab_size=300: set "
                     r"--config.model.vocab_size=\d+"):
    tokenizer.train_tokenizer(docs, 300)


def test_a_file_as_workdir_says_so(tmp_path):
  from bitnet_jax import rundir
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(rundir.NotWritable, match="is a file, not a directory"):
    rundir.RunDir(str(blocker)).prepare()


def test_an_unknown_task_is_an_error_before_anything_loads(tmp_path):
  """evaluate --tasks=no_such_task on a workdir that holds no run: the task
  is reported, not the missing run (it would load first otherwise)."""
  pytest.importorskip("lm_eval")
  import subprocess
  import sys
  from conftest import ROOT, subprocess_env
  proc = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.evaluate", f"--workdir={tmp_path}",
       "--tasks=no_such_task_xyz"], env=subprocess_env(), capture_output=True,
      text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors and "unknown lm-eval task" in errors[-1], proc.stderr[-600:]


def test_progress_lines_have_rate_and_eta():
  from bitnet_jax.progress import Progress, format_seconds
  now = [0.0]
  p = Progress(100, "windows", "scoring", every_s=10, clock=lambda: now[0])
  now[0] = 5.0
  assert p.advance(10) is None            # not 10 s yet
  now[0] = 20.0
  assert p.advance(30) == ("scoring: 40 / 100 windows (40%), 2.0 windows/s, "
                           "ETA 30s")
  now[0] = 100.0
  assert p.advance(60) is None            # done: the caller reports it
  assert format_seconds(4000) == "1h06m" and format_seconds(75) == "1m15s"


def test_progress_of_an_iterator_of_unknown_length():
  from bitnet_jax.progress import Progress
  now = [0.0]
  p = Progress(None, "documents", "reading", every_s=10, clock=lambda: now[0])
  now[0] = 20.0
  assert p.advance(50) == "reading: 50 documents, 2.5 documents/s"


def test_long_operations_report_progress(trained_run, caplog, monkeypatch):
  """Export, analysis figures, PTQ calibration and tokenizer training each
  log a progress line once they take longer than progress.EVERY_S (0 here)."""
  import logging
  import numpy as np
  from bitnet_jax import progress
  from bitnet_jax.baselines import rotation_ptq
  from bitnet_jax.data import tokenizer
  from bitnet_jax.evaluation import activation_report
  from bitnet_jax.inference import exported, pretrained
  from conftest import make_documents
  monkeypatch.setattr(progress, "EVERY_S", 0.0)
  caplog.set_level(logging.INFO)
  pre = pretrained.load(trained_run)
  exported.inference_params(pre.params, pre.model_cfg)
  rotation_ptq.mean_loss(lambda r, rows: 1.0, {}, np.zeros((8, 4)), 2)
  tokenizer.train_tokenizer(make_documents(300, seed=1), 512)
  stats = {"hist_edges": np.linspace(-1, 1, 5), "hist_counts": np.ones(4),
           "kurtosis": 3.0, "max_over_mean": 2.0}
  monkeypatch.setattr(activation_report, "STAGES", ("input",))
  runs = {"run": {f"layer{i}/o/input": stats for i in range(2)}}
  monkeypatch.setattr(activation_report.storage, "write_figure",
                      lambda fig, path: None)
  activation_report.write_figures("/nonexistent", runs)
  text = caplog.text
  for what in ("ternarizing: ", "calibration loss: ", "drawing: ",
               "reading for the tokenizer: ", "trained the tokenizer on 300 "
               "documents"):
    assert what in text, what
