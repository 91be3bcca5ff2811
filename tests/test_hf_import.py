"""Hugging Face BitNet checkpoints (the transformers layout, tiny and random,
written here) imported and run: logits against an independent float64 numpy
forward of that architecture (ReLU² GLU, sub-norms, GQA, RoPE, per-projection
absmean ternary weights, per-token absmax INT8 activations)."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.hf import layout, weights
from bitnet_jax.model import ModelConfig, Transformer

HF = {"model_type": "bitnet", "vocab_size": 96, "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2,
      "hidden_act": "relu2", "max_position_embeddings": 32,
      "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
      "tie_word_embeddings": False,
      "quantization_config": {"quant_method": "bitnet",
                              "linear_class": "autobitlinear",
                              "quantization_mode": "offline"}}
EPS = 1e-5
SHAPES = {"q_proj": ("H*E", "D"), "k_proj": ("K*E", "D"), "v_proj": ("K*E", "D"),
          "o_proj": ("D", "H*E"), "gate_proj": ("F", "D"), "up_proj": ("F", "D"),
          "down_proj": ("D", "F")}


def dims(hf):
  e = hf["hidden_size"] // hf["num_attention_heads"]
  return {"D": hf["hidden_size"], "F": hf["intermediate_size"],
          "H*E": hf["num_attention_heads"] * e,
          "K*E": hf["num_key_value_heads"] * e}


def hf_pack(codes):
  """transformers' packing written out: value + 1 of output row j goes to
  row j % R, bits 2 * (j // R), R = rows / 4."""
  rows = codes.shape[0] // 4
  packed = np.zeros((rows, codes.shape[1]), np.uint8)
  for j in range(codes.shape[0]):
    packed[j % rows] |= (codes[j] + 1).astype(np.uint8) << (2 * (j // rows))
  return packed


def checkpoint(form: str, hf=HF, seed=0):
  """{name: array} of a random model in the HF layout; `master` holds float
  weights (bf16-representable), `packed` uint8 codes and weight_scale."""
  rng = np.random.default_rng(seed)
  d = dims(hf)
  t = {}

  def bf16(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))

  for i in range(hf["num_hidden_layers"]):
    for proj, (rows, cols) in SHAPES.items():
      name = layout.projection_name(i, proj)
      shape = (d[rows], d[cols])
      if form == "master":
        t[name] = bf16(rng.standard_normal(shape) * 0.05)
      else:
        codes = rng.choice([-1, 0, 1], size=shape, p=[0.3, 0.4, 0.3])
        t[name] = hf_pack(codes)
        t[name[:-len("weight")] + "weight_scale"] = bf16(
            [rng.uniform(0.02, 0.08)])
    for norm, width in (("input_layernorm", "D"), ("self_attn.attn_sub_norm", "D"),
                        ("post_attention_layernorm", "D"), ("mlp.ffn_sub_norm", "F")):
      t[f"{layout.layer_prefix(i)}{norm}.weight"] = bf16(
          rng.uniform(0.5, 1.5, d[width]))
  t["model.embed_tokens.weight"] = bf16(rng.standard_normal((hf["vocab_size"], d["D"])))
  t["model.norm.weight"] = bf16(rng.uniform(0.5, 1.5, d["D"]))
  if not hf["tie_word_embeddings"]:
    t["lm_head.weight"] = bf16(rng.standard_normal((hf["vocab_size"], d["D"])) * 0.05)
  return t


# --- the float64 reference --------------------------------------------------


def ref_unpack(packed):
  rows = packed.shape[0]
  out = np.zeros((4 * rows, packed.shape[1]))
  for j in range(4 * rows):
    out[j] = ((packed[j % rows] >> (2 * (j // rows))) & 3).astype(np.float64) - 1
  return out


def ref_weight(t, name):
  """The ternary weight [out, in] the checkpoint means (float64)."""
  w = t[name]
  if w.dtype == np.uint8:
    return ref_unpack(w) * float(t[name[:-len("weight")] + "weight_scale"][0])
  w = w.astype(np.float64)
  alpha = np.mean(np.abs(w))
  return np.clip(np.round(w / (alpha + EPS)), -1, 1) * alpha


def ref_act(x):
  gamma = np.max(np.abs(x), axis=-1, keepdims=True)
  return np.clip(np.round(x * 127 / (gamma + EPS)), -128, 127) * gamma / 127


def ref_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def ref_rope(x, theta):  # x [T, heads, E]; rotate-half
  t, _, e = x.shape
  inv = 1.0 / theta ** (np.arange(0, e, 2) / e)
  ang = np.arange(t)[:, None] * inv[None]
  cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]
  sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]
  half = np.concatenate([-x[..., e // 2:], x[..., : e // 2]], -1)
  return x * cos + half * sin


def ref_logits(t, hf, tokens):
  eps = hf["rms_norm_eps"]
  heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
  e = hf["hidden_size"] // heads
  h = t["model.embed_tokens.weight"].astype(np.float64)[tokens]
  T = len(tokens)
  for i in range(hf["num_hidden_layers"]):
    p = layout.layer_prefix(i)
    W = lambda proj: ref_weight(t, layout.projection_name(i, proj))  # noqa: E731
    x = ref_act(ref_norm(h, t[p + "input_layernorm.weight"], eps))
    q = (x @ W("q_proj").T).reshape(T, heads, e)
    k = (x @ W("k_proj").T).reshape(T, kv, e)
    v = (x @ W("v_proj").T).reshape(T, kv, e)
    q, k = ref_rope(q, hf["rope_theta"]), ref_rope(k, hf["rope_theta"])
    out = np.zeros((T, heads, e))
    for hd in range(heads):
      kvh = hd // (heads // kv)
      s = q[:, hd] @ k[:, kvh].T / math.sqrt(e)
      s = np.where(np.tril(np.ones((T, T))) > 0, s, -np.inf)
      a = np.exp(s - s.max(-1, keepdims=True))
      out[:, hd] = (a / a.sum(-1, keepdims=True)) @ v[:, kvh]
    o = ref_norm(out.reshape(T, heads * e), t[p + "self_attn.attn_sub_norm.weight"], eps)
    h = h + ref_act(o) @ W("o_proj").T
    x = ref_act(ref_norm(h, t[p + "post_attention_layernorm.weight"], eps))
    f = np.maximum(x @ W("gate_proj").T, 0) ** 2 * (x @ W("up_proj").T)
    f = ref_norm(f, t[p + "mlp.ffn_sub_norm.weight"], eps)
    h = h + ref_act(f) @ W("down_proj").T
  h = ref_norm(h, t["model.norm.weight"], eps)
  head = t["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else \
      t["lm_head.weight"]
  return h @ head.astype(np.float64).T


# --- tests -------------------------------------------------------------------


def test_packing_is_transformers_layout():
  codes = np.random.default_rng(0).choice([-1, 0, 1], size=(16, 6)).astype(np.int8)
  np.testing.assert_array_equal(layout.pack(codes), hf_pack(codes))
  np.testing.assert_array_equal(layout.unpack(hf_pack(codes)), codes)
  np.testing.assert_array_equal(ref_unpack(layout.pack(codes)), codes)


@pytest.mark.parametrize("form,tied", [("master", False), ("packed", False),
                                       ("packed", True)])
def test_imported_logits_match_the_float64_reference(form, tied):
  hf = dict(HF, tie_word_embeddings=tied)
  t = checkpoint(form, hf)
  cfg = ModelConfig(**dict(layout.model_overrides(hf), seq_len=16))
  assert cfg.activation == "relu2" and cfg.kv_heads == 2
  params = jax.tree.map(jnp.asarray, weights.to_params(t, hf))
  tokens = np.random.default_rng(1).integers(0, hf["vocab_size"], 12)
  got = np.asarray(Transformer(cfg).apply({"params": params},
                                          jnp.asarray(tokens[None])))[0]
  want = ref_logits(t, hf, tokens)
  err = np.abs(got - want) / (np.abs(want).max() + 1e-9)
  # float32 vs float64; an activation code may round the other way at a tie
  assert np.median(err) < 1e-5 and err.max() < 1e-2, (np.median(err), err.max())


def test_packed_import_keeps_codes_and_scales_exactly():
  """Latent W = codes * alpha / mean|codes| quantizes back to the codes and
  to alpha itself (per projection)."""
  from bitnet_jax import quant
  t = checkpoint("packed")
  params = weights.to_params(t, HF)
  qkv = params["layers"]["attn"]["qkv"]["kernel"][0]     # [D, K, G+2, E]
  codes, alpha = quant.ternary_codes(jnp.asarray(qkv), (2, (0, 0, 1, 2)))
  name = layout.projection_name(0, "k_proj")
  want = ref_unpack(t[name]).T.reshape(64, 2, 16)
  np.testing.assert_array_equal(np.asarray(codes)[:, :, 2], want)
  np.testing.assert_allclose(float(alpha[1]),
                             float(t[name[:-6] + "weight_scale"][0]), rtol=1e-6)


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="not bitnet"):
    layout.model_overrides(dict(HF, model_type="llama"))
  with pytest.raises(KeyError, match="lm_head.weight is missing"):
    t = checkpoint("master")
    del t["lm_head.weight"]
    weights.to_params(t, HF)


def write_hf_dir(path, form: str, documents, vocab=320):
  """A Hugging Face BitNet directory: config.json, model.safetensors (bf16
  master weights or packed uint8 + weight_scale) and a byte-level BPE
  tokenizer.json trained with `tokenizers`."""
  import json
  from safetensors.flax import save_file
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  hf = dict(HF, vocab_size=vocab)
  t = checkpoint(form, hf)
  path.mkdir(parents=True, exist_ok=True)
  save_file({k: (jnp.asarray(v) if v.dtype == np.uint8 else
                 jnp.asarray(v, jnp.bfloat16)) for k, v in t.items()},
            str(path / "model.safetensors"))
  (path / "config.json").write_text(json.dumps(hf))
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(documents, trainers.BpeTrainer(
      vocab_size=vocab - 20, special_tokens=["<|begin_of_text|>",
                                             "<|end_of_text|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path / "tokenizer.json"))
  return hf, t


@pytest.mark.parametrize("form", ["master", "packed"])
def test_import_writes_a_run_that_loads_and_evaluates(tmp_path, documents,
                                                      form):
  from bitnet_jax.evaluation.perplexity import perplexity
  from bitnet_jax.hf import importer
  from bitnet_jax.inference import pretrained
  hf, t = write_hf_dir(tmp_path / "hf", form, documents)
  run = str(tmp_path / "run")
  info = importer.import_checkpoint(str(tmp_path / "hf"), run, seq_len=16)
  assert info["form"] == form
  pre = pretrained.load(run)
  assert pre.model_cfg.activation == "relu2" and pre.step == 0
  assert pre.tokenizer.bos_id == 0 and pre.tokenizer.eos_id == 1
  text = documents[0][:200]
  assert pre.tokenizer.decode(pre.tokenizer.encode(text)) == text
  tokens = np.asarray(pre.tokenizer.encode(text)[:12])
  got = np.asarray(pre.model.apply({"params": pre.params},
                                   jnp.asarray(tokens[None])))[0]
  want = ref_logits(t, hf, tokens)
  err = np.abs(got - want) / np.abs(want).max()
  assert np.median(err) < 1e-5 and err.max() < 1e-2
  assert np.isfinite(perplexity(pre, documents[:3], batch_size=2)["ppl"])
  with pytest.raises(Exception, match="already holds checkpoints"):
    importer.import_checkpoint(str(tmp_path / "hf"), run, seq_len=16)


@pytest.mark.slow
def test_imported_run_continues_training(tmp_path, documents, corpus_file):
  """train --config.init_from=<imported run>: the tokenizer.json travels
  with it, the schedule starts at step 0, losses are finite."""
  import json
  import subprocess
  import sys
  from conftest import subprocess_env
  write_hf_dir(tmp_path / "hf", "packed", documents)
  run, tuned = str(tmp_path / "run"), str(tmp_path / "tuned")
  out = subprocess.run([sys.executable, "-m", "bitnet_jax.hf", "import",
                        f"--hf_dir={tmp_path / 'hf'}", f"--workdir={run}",
                        "--seq_len=32"], capture_output=True, text=True,
                       env=subprocess_env())
  assert out.returncode == 0, out.stderr[-2000:]
  assert "packed weights" in out.stdout
  from bitnet_jax.training import trainer
  from conftest import small_run_config
  config = small_run_config(corpus_file, **{
      "train.stop_step": 3, "train.require_init_from": True})
  config.model = pytest.importorskip("bitnet_jax.rundir").RunDir(
      run).read_config().model
  config.init_from = run
  summary = trainer.train(config, tuned)
  assert summary["origin"] == "init_from" and summary["start_step"] == 0
  assert os.path.exists(os.path.join(tuned, "tokenizer.json"))
  rows = [json.loads(l) for l in open(os.path.join(tuned, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_export_then_import_gives_back_codes_and_scales(tmp_path, b158_run):
  """export --format=hf of a trained b1.58 run, imported again: the same
  ternary codes per projection, the exported (bf16) scales exactly, and a
  second export writes the same tensors bit for bit."""
  from bitnet_jax import quant
  from bitnet_jax.hf import exporter, importer
  from bitnet_jax.inference import pretrained
  pre = pretrained.load(b158_run)
  exporter.export_hf(pre, str(tmp_path / "hf"))
  cfg = json.load(open(tmp_path / "hf" / "config.json"))
  assert cfg["model_type"] == "bitnet" and cfg["hidden_act"] == "silu"
  assert cfg["quantization_config"]["linear_class"] == "autobitlinear"
  first = importer.read_tensors(str(tmp_path / "hf"))
  name = layout.projection_name(1, "v_proj")
  assert first[name].dtype == np.uint8 and first[name].shape == (
      pre.model_cfg.kv_heads * pre.model_cfg.head_dim // 4, pre.model_cfg.d_model)
  importer.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"))
  back = pretrained.load(str(tmp_path / "run"))
  groups = (2, (0,) * (pre.model_cfg.num_heads // pre.model_cfg.kv_heads) + (1, 2))
  for site, g in (("qkv", groups), ("o", None), ("up_gate", (1, (0, 1))),
                  ("down", None)):
    block = "attn" if site in ("qkv", "o") else "ffn"
    a = pre.params["layers"][block][site]["kernel"]
    b = back.params["layers"][block][site]["kernel"]
    for i in range(pre.model_cfg.num_layers):
      ca, sa = quant.ternary_codes(a[i], g)
      cb, sb = quant.ternary_codes(b[i], g)
      np.testing.assert_array_equal(np.asarray(ca), np.asarray(cb))
      # the file's bf16 scale, and the imported latent's absmean rounds
      # back to it (float32 absmean reductions: ~1e-5 relative)
      bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # noqa: E731
      np.testing.assert_array_equal(bf(sa), bf(sb))
      np.testing.assert_allclose(np.asarray(sb), bf(sa), rtol=5e-5)
  exporter.export_hf(back, str(tmp_path / "hf2"))
  second = importer.read_tensors(str(tmp_path / "hf2"))
  assert set(first) == set(second)
  for k in first:
    np.testing.assert_array_equal(first[k], second[k], err_msg=k)


def test_v2_runs_are_not_exported_to_hf(trained_run, tmp_path):
  from bitnet_jax.errors import ConfigError
  from bitnet_jax.hf import exporter
  from bitnet_jax.inference import pretrained
  with pytest.raises(ConfigError, match="no online Hadamard"):
    exporter.export_hf(pretrained.load(trained_run), str(tmp_path / "x"))


def test_bf16_master_export_round_trip(tmp_path, b158_run):
  from bitnet_jax.hf import exporter, importer
  from bitnet_jax.inference import pretrained
  pre = pretrained.load(b158_run)
  exporter.export_hf(pre, str(tmp_path / "hf"), "hf-bf16")
  assert json.load(open(tmp_path / "hf" / "config.json"))[
      "quantization_config"]["quantization_mode"] == "online"
  importer.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"))
  back = pretrained.load(str(tmp_path / "run"))
  for a, b in zip(jax.tree.leaves(pre.params), jax.tree.leaves(back.params)):
    np.testing.assert_array_equal(
        np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)),
        np.asarray(b))


def test_v2_conversion_keeps_the_float_function(tmp_path, documents):
  """--to_variant=v2: (H x) . (H W) = x . W, so without quantizers the
  converted v2 computes the b1.58 model's logits."""
  from bitnet_jax.hf import importer
  from bitnet_jax.inference import pretrained
  write_hf_dir(tmp_path / "hf", "master", documents)
  runs = {}
  for variant in ("b1.58", "v2"):
    info = importer.import_checkpoint(str(tmp_path / "hf"),
                                      str(tmp_path / variant), 16, variant)
    assert info["variant"] == variant
    runs[variant] = pretrained.load(str(tmp_path / variant))
  assert runs["v2"].model_cfg.variant == "v2"
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 300, (2, 16)))

  def logits(pre, **over):
    model = Transformer(pre.model_cfg.replace(**over))
    return np.asarray(model.apply({"params": pre.params}, tokens))
  np.testing.assert_allclose(logits(runs["v2"], quantized=False),
                             logits(runs["b1.58"], quantized=False),
                             rtol=1e-4, atol=1e-4)
  # quantized, the two differ (Q_w(H W), Q_x(H x)) but stay close
  a, b = logits(runs["v2"]), logits(runs["b1.58"])
  assert 0 < np.abs(a - b).mean() < 0.5 * np.abs(b).mean()
  with pytest.raises(Exception, match="to_variant"):
    importer.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "x"),
                               16, "a4.8")


@pytest.mark.slow
def test_conversion_experiment_smoke(tmp_path, b158_run, corpus_file):
  """experiments/hf_conversion end to end on the small b1.58 run: the
  exported-imported b1.58 scores as trained, the converted v2 starts far
  closer to it than the naive one."""
  import subprocess
  import sys
  from conftest import subprocess_env
  valid = tmp_path / "valid.txt"
  valid.write_text(open(corpus_file).read()[:20000])
  out = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.experiments.hf_conversion",
       f"--run={b158_run}", f"--valid={valid}", f"--out={tmp_path / 'out'}",
       "--steps=2", "--max_docs=8"], capture_output=True, text=True,
      env=subprocess_env())
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.load(open(tmp_path / "out" / "results.json"))["ppl"]
  base = r["b1.58 as trained"]
  assert r["b1.58 exported and imported"] == pytest.approx(base, rel=0.01)
  assert abs(r["v2 a8, before training"] / base - 1) < \
      abs(r["v2_naive a8, before training"] / base - 1)
  assert set(r) >= {"b1.58 a8, after 2 steps", "v2 a4, after 2 steps",
                    "v2_naive a8, after 2 steps"}


def test_bad_checkpoints_are_one_line_naming_the_file(tmp_path, documents):
  from bitnet_jax.errors import UserError
  from bitnet_jax.hf import importer
  hf_dir = tmp_path / "hf"
  write_hf_dir(hf_dir, "master", documents)

  def expect(match):
    with pytest.raises(UserError, match=match) as e:
      importer.import_checkpoint(str(hf_dir), str(tmp_path / "run"))
    assert "\n" not in str(e.value)

  cfg = json.loads((hf_dir / "config.json").read_text())
  (hf_dir / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
  expect("config.json: model_type 'llama' is not bitnet")
  (hf_dir / "config.json").write_text(json.dumps(dict(cfg, hidden_size=48)))
  expect("vs its config.json: parameter embed/embedding has shape")
  (hf_dir / "config.json").write_text(json.dumps(cfg))
  (hf_dir / "tokenizer.json").rename(hf_dir / "other.json")
  expect("has no tokenizer.json")
  (hf_dir / "other.json").rename(hf_dir / "tokenizer.json")
  (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00002.safetensors")
  (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
      "a": "model-00001-of-00002.safetensors",
      "b": "model-00002-of-00002.safetensors"}}))
  expect("shard model-00002-of-00002.safetensors .* is missing")
  (hf_dir / "model.safetensors.index.json").unlink()
  expect("has no model.safetensors")
  (hf_dir / "config.json").unlink()
  expect("has no config.json")


def test_a_float32_export_holds_our_float32_numbers(tmp_path, b158_run):
  """--format=hf --dtype=float32 (transformers loads a file only in the dtype
  it was written in): every float tensor float32 and equal to ours, the
  scales the absmean of each projection, config.json says float32;
  hf-bf16 in float32 is refused."""
  from bitnet_jax.errors import ConfigError
  from bitnet_jax.hf import exporter, importer
  from bitnet_jax.inference import pretrained
  pre = pretrained.load(b158_run)
  exporter.export_hf(pre, str(tmp_path / "hf"), "hf", "float32")
  assert json.load(open(tmp_path / "hf" / "config.json"))[
      "torch_dtype"] == "float32"
  got = importer.read_tensors(str(tmp_path / "hf"))
  floats = {k: v for k, v in got.items() if v.dtype != np.uint8}
  assert floats and all(v.dtype == np.float32 for v in floats.values())
  np.testing.assert_array_equal(got["model.embed_tokens.weight"],
                                np.asarray(pre.params["embed"]["embedding"]))
  o = np.asarray(pre.params["layers"]["attn"]["o"]["kernel"][0], np.float64)
  np.testing.assert_allclose(
      got[layout.projection_name(0, "o_proj")[:-len("weight")] +
          "weight_scale"], [np.abs(o).mean()], rtol=1e-6)
  with pytest.raises(ConfigError, match="--format=hf --dtype=float32"):
    exporter.export_hf(pre, str(tmp_path / "x"), "hf-bf16", "float32")
