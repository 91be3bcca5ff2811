"""GGUF export for llama.cpp (`export --format=gguf`), read back with the
`gguf` package's own reader and dequantizer: names, types, shapes and
metadata as llama.cpp's BitNet architecture loads them, and the ternary
codes and scales against the paper's Eq. 1 in float64 on the latent
weights (llama.cpp itself: tests/test_llama_cpp.py, optional)."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from bitnet_jax.errors import ConfigError  # noqa: E402
from bitnet_jax.gguf_file import layout, writer  # noqa: E402
from bitnet_jax.inference import pretrained  # noqa: E402

EPS = 1e-5


def test_tq2_0_blocks_are_what_ggml_dequantizes():
  codes = np.random.default_rng(0).integers(-1, 2, (3, 512)).astype(np.int8)
  packed = layout.pack_tq2_0(codes)
  assert packed.shape == (3, 2 * layout.BLOCK_BYTES)
  back = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.TQ2_0)
  np.testing.assert_array_equal(back, codes.astype(np.float32))
  with pytest.raises(ValueError, match="blocks of 256"):
    layout.pack_tq2_0(codes[:, :100])


def eq1(w):
  """Eq. 1 in float64: alpha = mean|W|, codes = RoundClip(W / (alpha + eps))."""
  w = np.asarray(w, np.float64)
  alpha = np.abs(w).mean()
  return np.clip(np.round(w / (alpha + EPS)), -1, 1), alpha


def test_the_file_is_the_run(gguf_run, tmp_path):
  pre = pretrained.load(gguf_run)
  cfg = pre.model_cfg
  writer.write(pre, str(tmp_path / "out"))
  r = gguf.GGUFReader(str(tmp_path / "out" / writer.FILE))
  meta = {f.name: f.contents() for f in r.fields.values()
          if not f.name.startswith("GGUF.")}
  assert meta["general.architecture"] == "bitnet"
  want = {"bitnet.embedding_length": 256, "bitnet.feed_forward_length": 512,
          "bitnet.block_count": cfg.num_layers, "bitnet.context_length": 64,
          "bitnet.attention.head_count": 4, "bitnet.attention.head_count_kv": 4,
          "bitnet.rope.dimension_count": 64, "bitnet.vocab_size": cfg.vocab_size,
          "tokenizer.ggml.model": "llama", "tokenizer.ggml.add_bos_token": True,
          "tokenizer.ggml.add_space_prefix": False,
          "tokenizer.ggml.bos_token_id": pre.tokenizer.bos_id,
          "tokenizer.ggml.eos_token_id": pre.tokenizer.eos_id}
  assert {k: meta[k] for k in want} == want
  assert meta["bitnet.rope.freq_base"] == pytest.approx(cfg.rope_theta)
  assert meta["bitnet.attention.layer_norm_rms_epsilon"] == pytest.approx(
      cfg.norm_eps)
  tokens = meta["tokenizer.ggml.tokens"]
  assert len(tokens) == cfg.vocab_size
  sp = pre.tokenizer.sp
  assert [tokens[i] for i in range(sp.vocab_size())] == [
      sp.id_to_piece(i) for i in range(sp.vocab_size())]
  assert meta["tokenizer.ggml.token_type"][pre.tokenizer.bos_id] == 3  # control
  got = {t.name: t for t in r.tensors}
  per_layer = ["attn_norm.weight", "attn_sub_norm.weight", "ffn_norm.weight",
               "ffn_sub_norm.weight"] + [
      f"{p}.{k}" for p in ("attn_q", "attn_k", "attn_v", "attn_output",
                           "ffn_gate", "ffn_up", "ffn_down")
      for k in ("weight", "scale")]
  assert set(got) == {"token_embd.weight", "output_norm.weight"} | {
      f"blk.{i}.{n}" for i in range(cfg.num_layers) for n in per_layer}
  np.testing.assert_array_equal(
      np.asarray(got["token_embd.weight"].data),
      np.asarray(pre.params["embed"]["embedding"]))
  layers = pre.params["layers"]
  qkv = np.asarray(layers["attn"]["qkv"]["kernel"], np.float64)  # [L, D, K, G+2, E]
  up_gate = np.asarray(layers["ffn"]["up_gate"]["kernel"], np.float64)
  for i in range(cfg.num_layers):
    d = cfg.d_model
    latent = {  # [out, in], as llama.cpp multiplies them
        "attn_q": qkv[i][:, :, :-2].reshape(d, -1).T,
        "attn_k": qkv[i][:, :, -2].reshape(d, -1).T,
        "attn_v": qkv[i][:, :, -1].reshape(d, -1).T,
        "attn_output": np.asarray(layers["attn"]["o"]["kernel"][i]).T,
        "ffn_up": up_gate[i][:, 0].T, "ffn_gate": up_gate[i][:, 1].T,
        "ffn_down": np.asarray(layers["ffn"]["down"]["kernel"][i]).T}
    for proj, w in latent.items():
      t = got[f"blk.{i}.{proj}.weight"]
      assert t.tensor_type == gguf.GGMLQuantizationType.TQ2_0
      assert [int(n) for n in t.shape] == [w.shape[1], w.shape[0]]  # ggml: ne0 first
      codes = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
      want_codes, alpha = eq1(w)
      np.testing.assert_array_equal(codes.reshape(w.shape), want_codes)
      scale = got[f"blk.{i}.{proj}.scale"]
      assert scale.tensor_type == gguf.GGMLQuantizationType.F32
      np.testing.assert_allclose(np.asarray(scale.data), [alpha], rtol=1e-6)
    norm = np.asarray(layers["ffn"]["down"]["norm"]["scale"][i])
    np.testing.assert_array_equal(
        np.asarray(got[f"blk.{i}.ffn_sub_norm.weight"].data), norm)


@pytest.mark.parametrize("change,message", [
    ({"variant": "v2"}, "no online Hadamard"),
    ({"activation": "relu2"}, "SiLU-gated FFN only"),
    ({"tie_embeddings": False}, "token embedding as the head"),
    ({"act_bits": 4}, "quantize them to 8 bits"),
    ({"d_ff": 384}, "multiples of 256"),
])
def test_what_llama_cpp_would_compute_differently_is_refused(
    gguf_run, change, message):
  pre = pretrained.load(gguf_run)
  with pytest.raises(ConfigError, match=message):
    writer.check_exportable(pre.model_cfg.replace(**change), pre.tokenizer)


def byte_level_run(gguf_run, tmp_path, vocab=320):
  """gguf_run with its sentencepiece model replaced by a byte-level BPE
  tokenizer.json (GPT-2's split) of at most `vocab` ids: the ids mean other
  text now, which a file's round trip does not care about."""
  import shutil
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from conftest import make_documents
  run = tmp_path / "bpe_run"
  shutil.copytree(gguf_run, run)
  (run / "tokenizer.model").unlink()
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(make_documents(200, seed=5), trainers.BpeTrainer(
      vocab_size=vocab - 10, special_tokens=["<|begin_of_text|>",
                                             "<|end_of_text|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(run / "tokenizer.json"))
  return str(run)


def test_a_tokenizer_json_run_gets_llama_cpp_bpe_metadata(gguf_run, tmp_path):
  import json
  pre = pretrained.load(byte_level_run(gguf_run, tmp_path))
  writer.write(pre, str(tmp_path / "out"))
  r = gguf.GGUFReader(str(tmp_path / "out" / writer.FILE))
  meta = {f.name: f.contents() for f in r.fields.values()}
  assert meta["tokenizer.ggml.model"] == "gpt2"
  assert meta["tokenizer.ggml.pre"] == "gpt-2"
  spec = json.loads(pre.tokenizer.json_text)
  vocab = spec["model"]["vocab"]
  tokens = meta["tokenizer.ggml.tokens"]
  assert len(tokens) == pre.model_cfg.vocab_size
  assert all(tokens[i] == piece for piece, i in vocab.items())
  assert meta["tokenizer.ggml.token_type"][pre.tokenizer.bos_id] == 3
  assert meta["tokenizer.ggml.merges"] == [
      m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
  other = json.loads(pre.tokenizer.json_text)
  other["pre_tokenizer"] = {"type": "Whitespace"}
  with pytest.raises(ValueError, match="not GPT-2's byte-level split"):
    layout.bpe_vocab(json.dumps(other), pre.model_cfg.vocab_size)
