"""The GGUF layout llama.cpp's BitNet architecture ("bitnet") loads: tensor
names, the TQ2_0 ternary blocks, and the sentencepiece vocabulary.

Per layer i, under `blk.{i}.` (shapes as numpy [rows, row length]):
  attn_norm.weight      [D]       the norm before W_q, W_k, W_v
  attn_{q,k,v}.weight   [out, D]  TQ2_0; `.scale` [1] float32: alpha
  attn_sub_norm.weight  [D]       the norm before W_o
  attn_output.weight    [D, H*E]  TQ2_0 (+ .scale)
  ffn_norm.weight       [D]       the norm before W_gate, W_up
  ffn_{gate,up}.weight  [F, D]    TQ2_0 (+ .scale)
  ffn_sub_norm.weight   [F]       the norm before W_down
  ffn_down.weight       [D, F]    TQ2_0 (+ .scale)
and `token_embd.weight` [V, D] (also the output head: llama.cpp's BitNet
graph multiplies by it), `output_norm.weight` [D].

TQ2_0 (ggml's 2.06-bit ternary type): each row in blocks of 256 values,
a block = 64 bytes of 2-bit fields (code + 1) and one float16 `d`; within
each run of 128 values, byte m holds values m, m + 32, m + 64, m + 96 in
bits 0-1, 2-3, 4-5, 6-7. We write d = 1 (exact in float16) and the absmean
alpha in the float32 `.scale` tensor llama.cpp multiplies each projection's
output by: the codes and alpha are exactly the training graph's. (TQ1_0,
1.69 bits, packs five codes per byte in base 3: smaller, but its CPU
kernel is slower, and TQ2_0's fields are the same 2-bit codes as ours.)
"""
from __future__ import annotations

import numpy as np

BLOCK = 256                      # values per TQ2_0 block (ggml's QK_K)
BLOCK_BYTES = BLOCK // 4 + 2     # 64 bytes of fields + float16 d
ARCH = "bitnet"

# HF BitNet name (hf/layout.py) -> GGUF name, per layer and model-wide
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.attn_sub_norm.weight": "attn_sub_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.ffn_sub_norm.weight": "ffn_sub_norm.weight"}
MODEL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
               "model.norm.weight": "output_norm.weight"}


def gguf_name(hf_name: str) -> str:
  """The GGUF name of an HF BitNet tensor name (`.weight_scale` -> `.scale`)."""
  if hf_name in MODEL_NAMES:
    return MODEL_NAMES[hf_name]
  if not hf_name.startswith("model.layers."):
    raise KeyError(f"no GGUF name for {hf_name}")
  layer, rest = hf_name[len("model.layers."):].split(".", 1)
  for key, name in LAYER_NAMES.items():
    if rest == key:
      return f"blk.{layer}.{name}"
    if rest.startswith(key + "."):
      kind = rest[len(key) + 1:]
      return f"blk.{layer}.{name}." + {"weight": "weight",
                                       "weight_scale": "scale"}[kind]
  raise KeyError(f"no GGUF name for {hf_name}")


def pack_tq2_0(codes: np.ndarray) -> np.ndarray:
  """int8 codes [rows, n] in {-1, 0, 1} (n a multiple of 256) -> uint8
  [rows, n / 256 * 66]: TQ2_0 blocks with d = 1."""
  codes = np.asarray(codes)
  rows, n = codes.shape
  if n % BLOCK:
    raise ValueError(f"rows of {n} values do not split into TQ2_0 blocks of "
                     f"{BLOCK}")
  fields = (codes.astype(np.int16) + 1).astype(np.uint8)
  # [rows, runs of 128, 4 quarters, 32]: quarter q of a run -> bits 2q
  runs = fields.reshape(rows, n // 128, 4, 32)
  packed = np.zeros((rows, n // 128, 32), np.uint8)
  for q in range(4):
    packed |= runs[:, :, q, :] << np.uint8(2 * q)
  blocks = packed.reshape(rows, n // BLOCK, BLOCK // 4)
  one = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)  # d, little-endian
  d = np.broadcast_to(one, (rows, n // BLOCK, 2))
  return np.concatenate([blocks, d], axis=-1).reshape(rows, -1)


def sentencepiece_vocab(model_proto: bytes, size: int
                        ) -> tuple[list[bytes], list[float], list[int]]:
  """(pieces, scores, token types) of a sentencepiece model, padded to
  `size` entries (the embedding's rows) with unused `[PAD<id>]` pieces.
  sentencepiece's piece types are GGUF's token types (normal 1, unknown 2,
  control 3, user-defined 4, unused 5, byte 6)."""
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  pieces = [p.piece.encode("utf-8") for p in proto.pieces]
  scores = [float(p.score) for p in proto.pieces]
  types = [int(p.type) for p in proto.pieces]
  if len(pieces) > size:
    raise ValueError(f"the tokenizer has {len(pieces)} pieces, more than the "
                     f"model's {size} embedding rows")
  for i in range(len(pieces), size):
    pieces.append(f"[PAD{i}]".encode())
    scores.append(-1000.0)
    types.append(5)
  return pieces, scores, types


def bpe_vocab(tokenizer_json: str, size: int
              ) -> tuple[list[str], list[int], list[str], str]:
  """(tokens, token types, merges, llama.cpp pre-tokenizer name) of a
  tokenizer.json byte-level BPE, padded to `size` entries. Only GPT-2's
  byte-level split (`ByteLevel` with its regex, no prefix space) is mapped,
  to llama.cpp's "gpt-2"; any other pre-tokenizer raises ValueError naming
  it. Special added tokens are control tokens (3), other added ones
  user-defined (4)."""
  import json
  spec = json.loads(tokenizer_json)
  model = spec.get("model") or {}
  if model.get("type") != "BPE":
    raise ValueError(f"its model is {model.get('type')!r}, not BPE")
  pre = spec.get("pre_tokenizer") or {}
  if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
          and not pre.get("add_prefix_space", False)):
    raise ValueError(f"its pre-tokenizer ({pre.get('type')!r}) is not GPT-2's "
                     "byte-level split, the one mapped to llama.cpp's gpt-2")
  entries = {int(i): (piece, 1) for piece, i in model["vocab"].items()}
  for t in spec.get("added_tokens", []):
    entries[int(t["id"])] = (t["content"], 3 if t.get("special") else 4)
  n = max(entries) + 1
  if n > size:
    raise ValueError(f"the tokenizer has {n} ids, more than the model's "
                     f"{size} embedding rows")
  tokens = [entries.get(i, (f"[PAD{i}]", 5))[0] for i in range(size)]
  types = [entries.get(i, (None, 5))[1] for i in range(size)]
  merges = [m if isinstance(m, str) else " ".join(m)
            for m in model.get("merges", [])]
  return tokens, types, merges, "gpt-2"
