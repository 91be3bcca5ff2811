"""Perplexity against a naive per-token loop; windows count each token once."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import subprocess_env
from bitnet_jax.evaluation import perplexity
from bitnet_jax.inference import pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("n,window,stride", [(2, 8, 8), (9, 8, 8), (30, 8, 8),
                                             (30, 8, 3), (31, 8, 1), (5, 8, 4)])
def test_window_plan_scores_every_target_once(n, window, stride):
  seen = []
  for begin, first, last in perplexity.window_plan(n, window, stride):
    assert begin < first <= last <= begin + window  # targets inside the window
    seen.extend(range(first, last + 1))
  assert seen == list(range(1, n))


def naive_logprobs(pre, tokens, window, stride):
  """One target at a time, each with the context its window holds: the
  first window reaching position p starts at k * stride,
  k = max(0, ceil((p - window) / stride)). (The context is right-padded to
  the window so one compiled shape serves every call; causal attention keeps
  the padding out of the scored position.)"""
  forward = jax.jit(lambda params, ctx: pre.model.apply(
      {"params": params}, ctx, bos_BL=ctx == pre.tokenizer.bos_id))
  out = []
  for p in range(1, len(tokens)):
    k = max(0, -(-(p - window) // stride))
    ctx = tokens[k * stride:p]
    padded = np.zeros((1, window), np.int32)
    padded[0, :len(ctx)] = ctx
    logits = forward(pre.params, padded)
    logp = jax.nn.log_softmax(np.asarray(logits[0, len(ctx) - 1], np.float64))
    out.append(float(logp[tokens[p]]))
  return np.asarray(out)


@pytest.mark.parametrize("window,stride,qkv", [(32, 32, None), (32, 11, None),
                                               (16, 5, (4, 3))])
def test_perplexity_equals_naive_loop(trained_run, window, stride, qkv):
  pre = pretrained.load(trained_run)
  if qkv:
    pre = pre.with_model(q_bits=qkv[0], kv_bits=qkv[1])
  docs = ["the good life", "Document 7: " + " ".join(["state of the world"] * 12)]
  tokens = [perplexity.document_tokens(pre.tokenizer, d) for d in docs]
  assert len(tokens[1]) > 2 * window  # several windows
  naive = [naive_logprobs(pre, t, window, stride) for t in tokens]
  lps, _ = perplexity.target_logprobs(pre, tokens, window, stride, batch_size=3)
  for got, want in zip(lps, naive):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  result = perplexity.perplexity(pre, docs, window, stride, batch_size=3)
  total = -sum(w.sum() for w in naive)
  assert result["tokens"] == sum(len(t) - 1 for t in tokens)
  assert result["nll"] == pytest.approx(total / result["tokens"], rel=1e-4)
  assert result["ppl"] == pytest.approx(np.exp(total / result["tokens"]), rel=1e-4)


def test_cli_writes_json(trained_run, tmp_path):
  out = tmp_path / "ppl.json"
  subprocess.run([sys.executable, "-m", "bitnet_jax.evaluate",
                  f"--workdir={trained_run}", f"--out={out}", "--stride=16",
                  "--kv_bits=4", "--q_bits=4"],
                 check=True, cwd=ROOT, capture_output=True, timeout=300,
                 env=subprocess_env())
  result = json.loads(out.read_text())
  assert result["window"] == 32 and result["stride"] == 16
  assert result["model"] == {"q_bits": 4, "kv_bits": 4}
  assert np.isfinite(result["ppl"]) and result["tokens"] > 100


def test_bad_runs_are_clear_errors(trained_run, tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    pretrained.load(str(tmp_path))
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(trained_run, "config.json"), bare / "config.json")
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    pretrained.load(str(bare))
  wrong = tmp_path / "wrong"
  shutil.copytree(trained_run, wrong)
  config = json.loads((wrong / "config.json").read_text())
  config["model"]["d_ff"] = 128
  (wrong / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"ffn/down/kernel has shape \(2, 64, 32\)"):
    pretrained.load(str(wrong))
  with pytest.raises(ValueError, match="cannot override"):
    pretrained.load(trained_run).with_model(d_model=64)


def test_a_file_given_by_path_is_scored_whole(trained_run, corpus_file):
  """--source=text --paths=FILE scores every document of the file (a user
  passing a test file means all of it); the run's own data defaults to its
  held-out split; --split=eval/train still pick the hash split."""
  pre = pretrained.load(trained_run)
  whole = perplexity.Documents(source="text", paths=corpus_file)
  docs, desc = perplexity.corpus_documents(pre, whole)
  assert len(docs) == 400 and desc.endswith("split all")  # conftest: 400 docs
  held, _ = perplexity.corpus_documents(
      pre, dataclasses.replace(whole, split="eval"))
  assert 0 < len(held) < 100
  own, desc = perplexity.corpus_documents(pre, perplexity.Documents())
  assert len(own) == len(held) and desc.endswith("split eval")
  first, _ = perplexity.corpus_documents(
      pre, dataclasses.replace(whole, max_docs=7))
  assert first == docs[:7]


def test_a_truncated_checkpoint_is_one_line_naming_it(trained_run, tmp_path):
  from bitnet_jax.checkpoint import CheckpointError
  from test_checkpoint import damage
  run = tmp_path / "run"
  shutil.copytree(trained_run, run)
  step = pretrained.load(str(run)).step
  damage(str(run / "checkpoints" / str(step)))
  with pytest.raises(CheckpointError) as err:
    pretrained.load(str(run))
  message = str(err.value)
  assert f"checkpoints/{step}/state" in message and "\n" not in message


# what the CUDA plugin of requirements-gpu-compile.txt prints on a GPU-less host
PLATFORM_NOISE = ("absl::InitializeLog", "cudart_stub.cc")


@pytest.mark.slow
def test_a_damaged_checkpoint_is_one_line_on_the_command_line(trained_run,
                                                              tmp_path):
  """No TensorStore pointer cut mid-word, no traceback of the reads still
  pending ("Exception ignored in <coroutine ...>", "Event loop is closed"):
  the error line alone; --verbose would print the reader's error."""
  from test_checkpoint import damage
  run = tmp_path / "run"
  shutil.copytree(trained_run, run)
  step = pretrained.load(str(run)).step
  damage(str(run / "checkpoints" / str(step)))
  proc = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.evaluate", f"--workdir={run}"],
      env=subprocess_env(), capture_output=True, text=True, timeout=300)
  lines = [l for l in proc.stderr.splitlines()
           if l.strip() and not any(n in l for n in PLATFORM_NOISE)]
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f"error: {run}/checkpoints/{step}/state: ")
  assert "--step=" in lines[0] and "bound method" not in lines[0]


def test_verbose_prints_the_error_behind_the_line(capsys):
  from bitnet_jax import cli
  from bitnet_jax.checkpoint import CheckpointError
  try:
    try:
      raise RuntimeError("tensorstore: DATA_LOSS: the whole detail")
    except RuntimeError as e:
      raise CheckpointError("the step cannot be read") from e
  except CheckpointError as e:
    cli.report(e, verbose=False)
    quiet = capsys.readouterr().err
    cli.report(e, verbose=True)
    verbose = capsys.readouterr().err
  assert quiet == "error: the step cannot be read\n"
  assert "DATA_LOSS: the whole detail" in verbose and "Traceback" in verbose
  assert verbose.endswith(quiet)


def test_a_library_reason_is_one_short_clause():
  from bitnet_jax.errors import reason
  e = Exception("Encountered error while reading array index: (slice(0, 2, "
                "1),). See full TensorStore details: <bound method pybind11_"
                "detail_function_record_v1_system_libstdcpp_gxx_abi_1xxx>\n"
                "line two")
  assert reason(e) == ("Exception: Encountered error while reading array "
                       "index: (slice(0, 2, 1),)")
  assert reason(ValueError("word " * 100)).endswith("word ...")
  assert len(reason(ValueError("word " * 100))) < 180
