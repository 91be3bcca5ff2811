"""A bitnet_jax BitNet b1.58 run -> one GGUF file for llama.cpp (`export
--format=gguf`), written with the `gguf` package (llama.cpp's own writer).

The tensors are the Hugging Face export's (hf/exporter.py, in float32: the
same ternary codes and per-projection absmean scales the training graph
used), renamed to llama.cpp's BitNet names (layout.py), the codes in TQ2_0
blocks. Exported only what llama.cpp's BitNet graph computes as we do
(llama.cpp's src/models/bitnet.cpp): a b1.58 model (no online Hadamard)
with 8-bit activations, a SiLU-gated FFN (its graph hard-codes SiLU; a
squared-ReLU run, as the 2B4T, would run with SiLU there), a tied embedding
(its head is the token embedding) and every projection's input a multiple
of 256 values (TQ2_0 blocks); a sentencepiece vocabulary, or a
tokenizer.json byte-level BPE with GPT-2's split. Everything else is refused
with one line.

What still differs: llama.cpp quantizes a TQ2_0 matmul's input to 8 bits
per block of 256 values (its Q8_K), we per token (Eq. 5's absmax over the
whole row): the same where a row is 256 values, finer in llama.cpp for
longer rows (W_down's input, d_ff values). It has no activation quantizer
of its own, and its KV cache is float16.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from bitnet_jax import policy, storage
from bitnet_jax.errors import ConfigError
from bitnet_jax.gguf_file import layout
from bitnet_jax.hf import exporter as hf_exporter
from bitnet_jax.hf import layout as hf_layout

FILE = "model.gguf"


def check_exportable(cfg, tokenizer) -> None:
  why = None
  if cfg.variant != "b1.58":
    why = (f"it is a {cfg.variant} model; llama.cpp implements BitNet b1.58 "
           "(no online Hadamard, no top-K): use --format=bitnet_jax")
  elif cfg.q_bits or cfg.kv_bits:
    why = "llama.cpp has no low-bit Q/K/V states"
  elif policy.glu_activation(cfg) != "swiglu":
    why = (f"its FFN is {policy.glu_activation(cfg)}; llama.cpp's BitNet graph "
           "computes a SiLU-gated FFN only (squared ReLU would run as SiLU)")
  elif not cfg.tie_embeddings:
    why = ("its output head is its own; llama.cpp's BitNet graph uses the "
           "token embedding as the head (train with model.tie_embeddings=true)")
  elif cfg.act_bits != 8:
    why = (f"it runs {cfg.act_bits}-bit activations; llama.cpp's ternary "
           "matmuls quantize them to 8 bits")
  elif cfg.d_model % layout.BLOCK or cfg.d_ff % layout.BLOCK:
    why = (f"d_model {cfg.d_model} and d_ff {cfg.d_ff} must be multiples of "
           f"{layout.BLOCK} (llama.cpp's ternary TQ2_0 blocks)")
  elif not hasattr(tokenizer, "sp"):  # a tokenizer.json
    try:
      layout.bpe_vocab(tokenizer.json_text, cfg.vocab_size)
    except ValueError as e:
      why = f"its tokenizer.json cannot be written for llama.cpp: {e}"
  if why:
    raise ConfigError(f"this run cannot be exported to GGUF: {why}")


def tensors(params, cfg) -> dict[str, tuple[np.ndarray, object]]:
  """{GGUF name: (array, GGML type or None for a plain float32 array)}."""
  import gguf
  out = {}
  for name, x in hf_exporter.tensors(params, cfg, "hf", "float32").items():
    if x.dtype == np.uint8:  # packed HF codes -> TQ2_0 blocks
      out[layout.gguf_name(name)] = (layout.pack_tq2_0(hf_layout.unpack(x)),
                                     gguf.GGMLQuantizationType.TQ2_0)
    else:
      out[layout.gguf_name(name)] = (np.asarray(x, np.float32), None)
  return out


def write(pre, out_dir: str, name: str = "") -> dict:
  """Write DIR/model.gguf: metadata, vocabulary and tensors."""
  cfg = pre.model_cfg
  check_exportable(cfg, pre.tokenizer)
  vocab = (layout.sentencepiece_vocab(pre.tokenizer.model_proto, cfg.vocab_size)
           if hasattr(pre.tokenizer, "sp") else
           layout.bpe_vocab(pre.tokenizer.json_text, cfg.vocab_size))
  out = storage.makedirs(out_dir)
  flat = tensors(pre.params, cfg)
  if storage.is_remote(out):  # the writer wants a local file: then copied
    with tempfile.TemporaryDirectory() as tmp:
      nbytes = _write_file(os.path.join(tmp, FILE), pre, flat, name, vocab)
      storage.copy_tree(tmp, out)
  else:
    nbytes = _write_file(os.fspath(out / FILE), pre, flat, name, vocab)
  return {"tensors": len(flat), "bytes": nbytes, "file": os.fspath(out / FILE),
          "format": "gguf", "type": "TQ2_0"}


def _write_file(path: str, pre, flat: dict, name: str, vocab) -> int:
  import gguf
  cfg, tok = pre.model_cfg, pre.tokenizer
  w = gguf.GGUFWriter(path, layout.ARCH)
  w.add_name(name or "bitnet_jax b1.58")
  w.add_context_length(cfg.seq_len)
  w.add_embedding_length(cfg.d_model)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.kv_heads)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0)
  w.add_quantization_version(gguf.GGML_QUANT_VERSION)
  w.add_string("bitnet_jax.step", str(pre.step))
  if hasattr(tok, "sp"):  # sentencepiece: llama.cpp's SPM
    pieces, scores, types = vocab
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(tok.sp.unk_id())
    w.add_add_space_prefix(False)  # trained with add_dummy_prefix=False
  else:  # a tokenizer.json byte-level BPE: llama.cpp's BPE
    tokens, types, merges, pre_name = vocab
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_name)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
  w.add_bos_token_id(tok.bos_id)
  w.add_eos_token_id(tok.eos_id)
  if tok.pad_id >= 0:
    w.add_pad_token_id(tok.pad_id)
  w.add_add_bos_token(True)   # documents start with BOS (perplexity.py)
  w.add_add_eos_token(False)
  for tensor_name, (array, qtype) in flat.items():
    w.add_tensor(tensor_name, array, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  os.chmod(path, storage.default_file_mode())
  return os.path.getsize(path)
