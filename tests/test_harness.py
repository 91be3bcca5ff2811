"""The lm-evaluation-harness adapter on a task defined here, scored offline."""
import json

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from bitnet_jax.evaluation import harness, perplexity  # noqa: E402
from bitnet_jax.inference import generation as generate  # noqa: E402
from bitnet_jax.inference import pretrained  # noqa: E402

QUESTIONS = [  # (context, choices, label); contexts end without a space
    ("The good life of the", [" world", " state", " people"], 0),
    ("Document 3: the", [" man", " time", " year", " day"], 2),
    ("Then we", [" came", " said"], 1),
    ("It was the first", [" day", " time", " year"], 0),
    ("There is no", [" way", " one", " man"], 1),
    ("She made the", [" world", " work"], 0),
]


@pytest.fixture(scope="module")
def pre(trained_run):
  return pretrained.load(trained_run)


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
  """A multiple-choice task YAML + JSON-lines data, both made here."""
  root = tmp_path_factory.mktemp("tasks")
  data = root / "mc.jsonl"
  with open(data, "w") as f:
    for context, choices, label in QUESTIONS:
      f.write(json.dumps({"context": context, "choices": choices,
                          "label": label}) + "\n")
  (root / "local_mc.yaml").write_text(f"""\
task: bitnet_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
target_delimiter: ""
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
  return str(root)


@pytest.fixture(scope="module")
def reference(pre):
  """sum log p(continuation | [BOS] + context) for every (context, choice),
  each from its own forward pass (right-padded to the context; causal
  attention keeps padding out) with a float64 log-softmax. Contexts are chosen
  so that tokenization splits cleanly at the boundary."""
  tok, width = pre.tokenizer, pre.model_cfg.seq_len
  forward = jax.jit(lambda params, seq: pre.model.apply(
      {"params": params}, seq, bos_BL=seq == tok.bos_id))

  def loglikelihood(context, continuation):
    ctx = [tok.bos_id, *tok.encode(context)]
    whole = [tok.bos_id, *tok.encode(context + continuation)]
    assert whole[:len(ctx)] == ctx, "test data must tokenize at the boundary"
    seq = np.zeros((1, width), np.int32)
    seq[0, :len(whole) - 1] = whole[:-1]
    logp = jax.nn.log_softmax(np.asarray(forward(pre.params, seq)[0], np.float64),
                              axis=-1)
    targets = whole[1:]
    return sum(float(logp[i, targets[i]])
               for i in range(len(ctx) - 1, len(targets)))

  return {(c, x): loglikelihood(c, x) for c, choices, _ in QUESTIONS
          for x in choices}


def test_accuracy_equals_own_loglikelihoods(pre, reference, local_task,
                                            monkeypatch, tmp_path):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  want = np.mean([
      int(np.argmax([reference[c, x] for x in choices]) == label)
      for c, choices, label in QUESTIONS])
  result = harness.run_tasks(pre, ["bitnet_local_mc"], include_path=local_task,
                             batch_size=4)
  got = result["results"]["bitnet_local_mc"]["acc,none"]
  assert got == pytest.approx(want, abs=1e-9)
  assert "bitnet_local_mc" in result["table"]


def test_loglikelihood_matches_reference_and_perplexity_path(pre, reference):
  lm = harness.BitNetLM(pretrained=pre, batch_size=3)

  class Req:
    def __init__(self, *args):
      self.args = args

  pairs = [(c, x) for c, choices, _ in QUESTIONS for x in choices]
  got = lm.loglikelihood([Req(c, x) for c, x in pairs])
  for (c, x), (lp, _) in zip(pairs, got):
    assert lp == pytest.approx(reference[c, x], rel=1e-4,
                               abs=1e-5)
  text = "Document 5: " + " ".join(["the good life of the world"] * 10)
  rolling = lm.loglikelihood_rolling([Req(text)])[0]
  tokens = [pre.tokenizer.bos_id, *pre.tokenizer.encode(text)]
  lps, _ = perplexity.target_logprobs(pre, [tokens], pre.model_cfg.seq_len,
                                    pre.model_cfg.seq_len)
  assert len(tokens) > pre.model_cfg.seq_len  # spans several windows
  assert rolling == pytest.approx(float(lps[0].sum()), rel=1e-6)
  # the same text with empty context through loglikelihood (one window)
  short = "the good life"
  lp, _ = lm.loglikelihood([Req("", short)])[0]
  lps, _ = perplexity.target_logprobs(pre, [[pre.tokenizer.bos_id,
                                            *pre.tokenizer.encode(short)]], 32, 32)
  assert lp == pytest.approx(float(lps[0].sum()), rel=1e-5)


def test_generate_until_stops_at_stop_sequences(pre):
  lm = harness.BitNetLM(pretrained=pre)

  class Req:
    def __init__(self, *args):
      self.args = args

  free = generate.generate_text(pre, ["The good"], max_new_tokens=12)[0]
  assert len(free) > 4
  stop = free[2:4]  # a piece the greedy continuation is known to contain
  out = lm.generate_until([Req("The good", {"until": [stop], "max_gen_toks": 12})])
  assert out == [free[:free.find(stop)]]
  assert stop not in out[0]


def test_unknown_task_is_an_error(pre):
  with pytest.raises(ValueError, match="unknown lm-eval task.*no_such_task"):
    harness.run_tasks(pre, ["no_such_task"])
