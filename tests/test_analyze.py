"""Activation analysis: statistics against float64 numpy, planted outliers,
the Hadamard's effect, the model's sown inputs, and the CLI's figures."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import small_run_config, subprocess_env
from bitnet_jax import hadamard
from bitnet_jax import activation_stats
from bitnet_jax.evaluation import activation_report as analyze
from bitnet_jax.model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANTED = [3, 17, 40, 41]


def planted(seed=0, tokens=512, channels=64, scale=30.0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((tokens, channels))
  x[:, PLANTED] *= scale
  return x


def np_summary(x):
  """The statistics, written out in float64 numpy."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  c = x - x.mean()
  channel_max = np.abs(x).max(axis=0)
  outliers = channel_max > 8.0 * np.median(channel_max)
  beta = np.maximum(np.abs(x).mean(axis=-1, keepdims=True), 1e-5)  # Eq. 6
  codes = np.clip(np.round(x * np.sqrt(7.0) / beta), -8, 7)
  energy = x ** 2
  share = (energy / np.maximum(energy.sum(-1, keepdims=True), 1e-30)).mean(0)
  offset = (np.abs(x.mean(0)) > 2.0 * x.std(0)) & (share > 4.0 / x.shape[-1])
  return {"kurtosis": (c ** 4).mean() / (c ** 2).mean() ** 2,
          "max_channel_energy": share.max(), "offset_channels": offset.sum(),
          "max_over_mean": np.abs(x).max() / np.abs(x).mean(),
          "outlier_share": outliers.mean(), "outliers": np.flatnonzero(outliers),
          "int4_zero_share": (codes == 0).mean()}


@pytest.mark.parametrize("seed,scale", [(0, 30.0), (1, 12.0), (2, 1.0)])
def test_summary_equals_float64_reference(seed, scale):
  x = planted(seed, scale=scale)
  got = jax.device_get(activation_stats.summarize_jit(x.astype(np.float32)))
  want = np_summary(x.astype(np.float32))
  for key in activation_stats.SCALARS:
    assert float(got[key]) == pytest.approx(want[key], rel=2e-4, abs=1e-6), key
  np.testing.assert_array_equal(np.flatnonzero(got["outlier_mask"]), want["outliers"])
  assert got["hist_counts"].sum() == x.size
  assert got["hist_edges"][0] == pytest.approx(-np.abs(x).max(), rel=1e-6)


def test_planted_outlier_channels_are_found_exactly():
  got = activation_stats.summarize_jit(planted().astype(np.float32))
  assert np.flatnonzero(got["outlier_mask"]).tolist() == PLANTED
  assert float(got["outlier_share"]) == len(PLANTED) / 64


def test_a_token_shared_offset_channel_is_flagged_with_its_energy():
  """The audit's picture: one channel carrying a per-token constant (a bias
  in effect) holds a large, known share of each token's energy."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((512, 64))
  x[:, 9] = 4.0 + 0.1 * rng.standard_normal(512)  # share ~ 16 / (63 + 16)
  got = jax.device_get(activation_stats.summarize_jit(x.astype(np.float32)))
  want = np_summary(x.astype(np.float32))
  assert float(got["offset_channels"]) == 1 == want["offset_channels"]
  assert float(got["max_channel_energy"]) == pytest.approx(
      want["max_channel_energy"], rel=1e-4)
  assert 0.17 < float(got["max_channel_energy"]) < 0.23
  plain = jax.device_get(activation_stats.summarize_jit(
      rng.standard_normal((512, 64)).astype(np.float32)))
  assert float(plain["offset_channels"]) == 0
  assert float(plain["max_channel_energy"]) < 2.0 / 64


def test_hadamard_removes_planted_outliers():
  x = planted().astype(np.float32)
  before = jax.device_get(activation_stats.summarize_jit(x))
  after = jax.device_get(activation_stats.summarize_jit(hadamard.fwht(x)))
  assert before["kurtosis"] > 10.0
  assert after["kurtosis"] < 0.5 * before["kurtosis"]
  assert abs(after["kurtosis"] - 3.0) < 0.5  # close to Gaussian
  assert not after["outlier_mask"].any()
  assert after["max_over_mean"] < before["max_over_mean"]


@pytest.mark.parametrize("variant", ["v2", "b1.58", "fp"])
def test_summarizer_finds_every_layer_input(variant):
  """Scanned and unrolled layers give the same keys and statistics, and the
  statistics are those of the inputs recomputed by hand for layer 0's W_qkv."""
  cfg = ModelConfig(vocab_size=64, d_model=32, d_ff=64, num_heads=2,
                    num_layers=2, seq_len=16, variant=variant)
  tokens = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)
  params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
  scanned = jax.device_get(activation_stats.make_summarizer(Transformer(cfg))(params, tokens))
  sites = [f"layer{i}/{s}/input" for i in range(2) for s in ("qkv", "o", "up_gate", "down")]
  rotated = ([f"layer{i}/{s}/pre_rotation" for i in range(2) for s in ("o", "down")]
             if variant == "v2" else [])
  assert sorted(scanned) == sorted(sites + rotated)
  unrolled_cfg = cfg.replace(scan_layers=False)
  unrolled_params = {k: v for k, v in params.items() if k != "layers"}
  for i in range(2):
    unrolled_params[f"layer_{i}"] = jax.tree.map(lambda a: a[i], params["layers"])
  unrolled = jax.device_get(activation_stats.make_summarizer(Transformer(unrolled_cfg))(
      unrolled_params, tokens))
  assert sorted(unrolled) == sorted(scanned)
  for key in scanned:
    for stat in activation_stats.SCALARS:
      assert unrolled[key][stat] == pytest.approx(scanned[key][stat], rel=1e-4,
                                                  abs=1e-6), (key, stat)
  # layer 0's W_qkv input by hand: the embedding, then (BitLinear) its RMSNorm
  x = np.asarray(params["embed"]["embedding"], np.float64)[tokens]
  if variant == "fp":
    scale = np.asarray(params["layers"]["attn_norm"]["scale"][0], np.float64)
  else:
    scale = np.asarray(params["layers"]["attn"]["qkv"]["norm"]["scale"][0], np.float64)
  x = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * scale
  assert scanned["layer0/qkv/input"]["kurtosis"] == pytest.approx(
      np_summary(x)["kurtosis"], rel=1e-4)


def test_cli_compares_two_runs(trained_run, b158_run, tmp_path):
  out = tmp_path / "acts"
  proc = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.analyze",
       f"--workdir={b158_run},{trained_run}", f"--out={out}", "--num_seqs=4"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=subprocess_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((out / "summary.json").read_text())
  runs = summary["runs"]
  assert len(runs) == 2
  b158, v2 = (runs[k] for k in sorted(runs))  # "BitNet b1.58 ..." < "BitNet v2 ..."
  assert "layer1/down/pre_rotation" in v2 and "layer1/down/pre_rotation" not in b158
  assert len(v2) == 2 * 4 + 2 * 2 and len(b158) == 2 * 4
  for stats in (*b158.values(), *v2.values()):
    assert stats["kurtosis"] > 1.0 and 0.0 <= stats["int4_zero_share"] <= 1.0
  # one figure per layer and site; panels: b1.58 input | v2 (before, after H)
  for layer in range(2):
    for site, panels in (("qkv", 2), ("up_gate", 2), ("o", 3), ("down", 3)):
      with Image.open(out / f"layer{layer}_{site}.png") as im:
        im.load()
        assert im.size == (400 * panels, 300)
        assert np.asarray(im.convert("L")).std() > 10  # not blank


def test_bad_inputs_are_clear_errors(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.analyze", f"--workdir={tmp_path}",
       f"--out={tmp_path / 'out'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=subprocess_env())
  assert proc.returncode == 1 and "no config.json" in proc.stderr
  with pytest.raises(ValueError, match="fewer than one sequence"):
    analyze.text_batch(type("P", (), {
        "tokenizer": type("T", (), {"bos_id": 1, "eos_id": 2,
                                     "encode": lambda self, s: [5, 6]})(),
        "model_cfg": ModelConfig(vocab_size=8, d_model=8, d_ff=8, num_heads=2,
                                 num_layers=1, seq_len=16)})(), ["hi"], 2)


def read_events(directory):
  """(tag, kind) of every summary value in a TensorBoard event directory."""
  import struct
  from tensorboardX.proto import event_pb2
  seen = set()
  for name in os.listdir(directory):
    data = open(os.path.join(directory, name), "rb").read()
    i = 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4
      for v in event.summary.value:
        seen.add((v.tag, v.WhichOneof("value"), event.step))
  return seen


def test_training_logs_activation_summaries(tmp_path, corpus_file):
  from bitnet_jax.training import trainer
  workdir = str(tmp_path / "run")
  trainer.train(small_run_config(corpus_file, **{
      "train.stop_step": 10, "train.analysis_every": 5}), workdir)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = {r["step"]: r for r in rows if "activations/layer1/down/input/kurtosis" in r}
  assert sorted(logged) == [5, 10]
  row = logged[10]
  for layer in range(2):
    for key in ("qkv/input", "up_gate/input", "o/input", "down/input",
                "o/pre_rotation", "down/pre_rotation"):
      for stat in activation_stats.SCALARS:
        assert np.isfinite(row[f"activations/layer{layer}/{key}/{stat}"])
  events = read_events(os.path.join(workdir, "tensorboard"))
  assert ("activations/layer0/down/pre_rotation", "histo", 10) in events
  assert ("activations/layer1/qkv/input/kurtosis", "simple_value", 5) in events
