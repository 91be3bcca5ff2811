"""The Hugging Face BitNet layout (transformers' `BitNetForCausalLM`, as in
BitNet b1.58 2B4T): config keys, tensor names, and the packed form.

Per layer i, under `model.layers.{i}.`:
  input_layernorm.weight            [D]     the norm before W_q, W_k, W_v
  self_attn.{q,k,v}_proj.weight     [out, D] (q: H*E rows, k/v: K*E rows)
  self_attn.attn_sub_norm.weight    [D]     the norm before W_o
  self_attn.o_proj.weight           [D, H*E]
  post_attention_layernorm.weight   [D]     the norm before W_gate, W_up
  mlp.{gate,up}_proj.weight         [F, D]
  mlp.ffn_sub_norm.weight           [F]     the norm before W_down
  mlp.down_proj.weight              [D, F]
and `model.embed_tokens.weight` [V, D], `model.norm.weight` [D],
`lm_head.weight` [V, D] (absent when tie_word_embeddings).

Packed form: a projection's weight is uint8 [out / 4, in] holding the
ternary codes + 1 in 2-bit fields: field i (bits 2i, 2i + 1) of row r is
output row i * out / 4 + r; `.weight_scale` [1] is the absmean alpha (the
`autobitlinear` class multiplies the output by it; the older `bitlinear`
class divides by it, i.e. stores 1 / alpha).
"""
from __future__ import annotations

import numpy as np

CONFIG_FILE = "config.json"               # the Hugging Face directory's files
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROJECTIONS = {  # HF projection -> (block, its norm)
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
    "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp",
    "down_proj": "mlp"}
NORMS = {"input_layernorm": "qkv", "self_attn.attn_sub_norm": "o",
         "post_attention_layernorm": "up_gate", "mlp.ffn_sub_norm": "down"}


def layer_prefix(i: int) -> str:
  return f"model.layers.{i}."


def projection_name(i: int, proj: str) -> str:
  return f"{layer_prefix(i)}{PROJECTIONS[proj]}.{proj}.weight"


def unpack(packed: np.ndarray) -> np.ndarray:
  """uint8 [out / 4, in] -> int8 codes [out, in] in {-1, 0, 1}."""
  packed = np.asarray(packed, np.uint8)
  fields = [((packed >> (2 * i)) & 3).astype(np.int8) - 1 for i in range(4)]
  return np.concatenate(fields, axis=0)


def pack(codes: np.ndarray) -> np.ndarray:
  """int8 codes [out, in] (out divisible by 4) -> uint8 [out / 4, in]."""
  codes = np.asarray(codes)
  if codes.shape[0] % 4:
    raise ValueError(f"{codes.shape[0]} output rows do not split into 4 "
                     "packed fields")
  rows = codes.shape[0] // 4
  out = np.zeros((rows,) + codes.shape[1:], np.uint8)
  for i in range(4):
    out |= (codes[i * rows:(i + 1) * rows] + 1).astype(np.uint8) << (2 * i)
  return out


def model_overrides(hf: dict) -> dict:
  """config.json of a HF BitNet model -> bitnet_jax `model` fields."""
  if hf.get("model_type") not in (None, "bitnet"):
    raise ValueError(f"model_type {hf.get('model_type')!r} is not bitnet")
  act = hf.get("hidden_act", "relu2")
  if act not in ("relu2", "silu"):
    raise ValueError(f"hidden_act {act!r}: bitnet_jax has relu2 and silu "
                     "(SwiGLU) GLUs")
  return {"variant": "b1.58", "vocab_size": hf["vocab_size"],
          "d_model": hf["hidden_size"], "d_ff": hf["intermediate_size"],
          "num_layers": hf["num_hidden_layers"],
          "num_heads": hf["num_attention_heads"],
          "num_kv_heads": hf.get("num_key_value_heads") or 0,
          "seq_len": hf.get("max_position_embeddings", 2048),
          "rope_theta": float(hf.get("rope_theta", 10000.0)),
          "norm_eps": float(hf.get("rms_norm_eps", 1e-5)),
          "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
          "activation": "relu2" if act == "relu2" else "swiglu"}


def scale_multiplies(hf: dict) -> bool:
  """Whether `.weight_scale` multiplies the output (autobitlinear, the
  released checkpoints) or divides it (the older bitlinear class)."""
  q = hf.get("quantization_config") or {}
  return q.get("linear_class", "autobitlinear") == "autobitlinear"
