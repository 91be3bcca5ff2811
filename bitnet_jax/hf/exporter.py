"""A bitnet_jax BitNet b1.58 run -> a Hugging Face BitNet directory.

  format 'hf'       packed uint8 codes + a `weight_scale` per projection
                    (transformers' `autobitlinear`, offline quantization):
                    exactly the ternary weights and per-projection scales the
                    training graph used
  format 'hf-bf16'  the latent (master) weights in bf16 (online
                    quantization; what bitnet.cpp's converter turns into
                    GGUF i2_s)

The inverse of weights.py: our fused kernels split into q/k/v and gate/up,
transposed to [out, in]; scales, norms, embedding, final norm and head in
`dtype` (bfloat16, as published BitNet checkpoints; float32 for 'hf' only);
config.json in BitNetConfig's keys; the run's tokenizer file copied.

transformers (5.23) keeps a pre-quantized checkpoint's float tensors in the
file's dtype whatever `from_pretrained(..., dtype=)` asks, while it unpacks
the ternary codes to the dtype asked for: a file loads in the dtype it was
written in (`torch_dtype` in its config.json), and in no other.

Only b1.58 runs (no Hadamard: transformers and bitnet.cpp have no online
rotation, so a v2 model would compute something else) with a squared-ReLU or
SwiGLU GLU and no post-RoPE Q/K/V quantization.
"""
from __future__ import annotations

import json

import numpy as np

from bitnet_jax import policy, quant, storage
from bitnet_jax.errors import ConfigError
from bitnet_jax.hf import layout
from bitnet_jax.inference.exported import FLOAT_DTYPES

FORMATS = ("hf", "hf-bf16")
SITE_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
           "up_proj": "up_gate", "gate_proj": "up_gate", "down_proj": "down"}


def check_exportable(cfg, fmt: str, dtype: str = "bfloat16") -> None:
  if fmt not in FORMATS:
    raise ConfigError(f"format must be one of {FORMATS}, got {fmt!r}")
  if dtype not in FLOAT_DTYPES:
    raise ConfigError(f"--dtype must be one of {tuple(FLOAT_DTYPES)}, got "
                      f"{dtype!r}")
  if fmt == "hf-bf16" and dtype != "bfloat16":
    raise ConfigError("hf-bf16 holds the master weights in bfloat16: for a "
                      "float32 export use --format=hf --dtype=float32")
  if cfg.variant != "b1.58":
    raise ConfigError(
        f"a {cfg.variant} run cannot be exported to the Hugging Face layout: "
        "transformers' BitNet and bitnet.cpp implement BitNet b1.58 (no online "
        "Hadamard, no top-K); use the bitnet_jax format (--format=bitnet_jax)")
  if cfg.q_bits or cfg.kv_bits:
    raise ConfigError("the Hugging Face layout has no low-bit Q/K/V states")
  if fmt == "hf-bf16" and cfg.weight_scale != "projection":
    raise ConfigError("hf-bf16 master weights are quantized per projection "
                      "by transformers; this run used one scale per fused "
                      "kernel (quant.weight_scale=tensor): export --format=hf")


def hf_config(cfg, tokenizer, fmt: str, dtype: str = "bfloat16") -> dict:
  return {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
         "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
         "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
         "num_attention_heads": cfg.num_heads,
         "num_key_value_heads": cfg.kv_heads,
         "hidden_act": ("relu2" if policy.glu_activation(cfg) == "relu2"
                        else "silu"),
         "max_position_embeddings": cfg.seq_len, "rope_theta": cfg.rope_theta,
         "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
         "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
         "attention_bias": False, "torch_dtype": dtype,
         "quantization_config": {
             "quant_method": "bitnet", "linear_class": "autobitlinear",
             "quantization_mode": "offline" if fmt == "hf" else "online"}}


def _as(dtype: str):
  """x -> a numpy array in `dtype` (bfloat16 through JAX's ml_dtypes)."""
  import jax.numpy as jnp
  return lambda x: np.asarray(jnp.asarray(x, FLOAT_DTYPES[dtype]))


def projections(layer: dict, cfg) -> dict[str, np.ndarray]:
  """Latent [out, in] float32 weight of each HF projection of one layer."""
  qkv = np.asarray(layer["attn"]["qkv"]["kernel"], np.float32)  # [D, K, G+2, E]
  d, k, g2, e = qkv.shape
  up_gate = np.asarray(layer["ffn"]["up_gate"]["kernel"], np.float32)
  return {"q_proj": qkv[:, :, : g2 - 2].reshape(d, -1).T,
          "k_proj": qkv[:, :, g2 - 2].reshape(d, -1).T,
          "v_proj": qkv[:, :, g2 - 1].reshape(d, -1).T,
          "o_proj": np.asarray(layer["attn"]["o"]["kernel"], np.float32).T,
          "up_proj": up_gate[:, 0].T, "gate_proj": up_gate[:, 1].T,
          "down_proj": np.asarray(layer["ffn"]["down"]["kernel"], np.float32).T}


def tensors(params, cfg, fmt: str, dtype: str = "bfloat16"
            ) -> dict[str, np.ndarray]:
  """{HF name: array} of a run's latent parameters (layers stacked)."""
  import jax
  cast = _as(dtype)  # hf-bf16: bfloat16 (check_exportable)
  out = {"model.embed_tokens.weight": cast(params["embed"]["embedding"]),
         "model.norm.weight": cast(params["final_norm"]["scale"])}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = cast(np.asarray(params["head"]["kernel"]).T)
  shared = {}  # weight_scale='tensor': one alpha per fused kernel
  stacked = jax.tree.map(np.asarray, params["layers"])  # to the host once
  for i in range(cfg.num_layers):
    layer = jax.tree.map(lambda x: x[i], stacked)
    if cfg.weight_scale == "tensor":
      for site, block in (("qkv", "attn"), ("o", "attn"), ("up_gate", "ffn"),
                          ("down", "ffn")):
        shared[site] = float(quant.absmean(np.asarray(
            layer[block][site]["kernel"], np.float32)))
    for proj, w in projections(layer, cfg).items():
      name = layout.projection_name(i, proj)
      if fmt == "hf-bf16":
        out[name] = cast(w)
        continue
      alpha = shared.get(SITE_OF[proj])
      if alpha is None:
        codes, alpha = quant.ternary_codes(w)
      else:
        codes = np.clip(np.round(w / (alpha + quant.EPS)), -1, 1)
      out[name] = layout.pack(np.asarray(codes, np.int8))
      out[name[: -len("weight")] + "weight_scale"] = cast([float(alpha)])
    for hf_norm, site in layout.NORMS.items():
      block = "attn" if site in ("qkv", "o") else "ffn"
      out[f"{layout.layer_prefix(i)}{hf_norm}.weight"] = cast(
          layer[block][site]["norm"]["scale"])
  return out


def export_hf(pre, out_dir: str, fmt: str = "hf", dtype: str = "bfloat16"
              ) -> dict:
  """Write config.json, model.safetensors and the tokenizer file."""
  import jax.numpy as jnp
  cfg = pre.model_cfg
  check_exportable(cfg, fmt, dtype)
  flat = tensors(pre.params, cfg, fmt, dtype)
  out = storage.makedirs(out_dir)
  nbytes = storage.save_safetensors(
      {k: jnp.asarray(v) for k, v in flat.items()}, out / layout.WEIGHTS_FILE,
      metadata={"format": "pt"}, framework="flax")
  (out / layout.CONFIG_FILE).write_text(
      json.dumps(hf_config(cfg, pre.tokenizer, fmt, dtype), indent=2))
  pre.tokenizer.save(out / pre.tokenizer.filename)
  return {"tensors": len(flat), "format": fmt, "dtype": dtype,
          "tokenizer": pre.tokenizer.filename, "bytes": nbytes}

