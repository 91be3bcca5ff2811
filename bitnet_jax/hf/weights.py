"""Hugging Face BitNet tensors -> bitnet_jax latent parameters (scanned
layers, per-projection absmean scales).

  input_layernorm           -> layers/attn/qkv/norm/scale
  attn_sub_norm             -> layers/attn/o/norm/scale
  post_attention_layernorm  -> layers/ffn/up_gate/norm/scale
  ffn_sub_norm              -> layers/ffn/down/norm/scale
  q/k/v_proj [out, D]       -> layers/attn/qkv/kernel [D, K, G + 2, E]
                               (query head k * G + g in slot g of kv head k,
                               then K, then V: transformers' repeat_kv order)
  o_proj [D, H*E]           -> layers/attn/o/kernel [H*E, D]
  gate/up_proj [F, D]       -> layers/ffn/up_gate/kernel [D, 2, F] (up, gate)
  down_proj [D, F]          -> layers/ffn/down/kernel [F, D]

Master (bf16/f32) weights load as they are: our quantizer computes the same
per-projection absmean. Packed weights (codes, alpha) load as the latent
W = codes * alpha / mean|codes|, whose absmean is alpha and whose codes
round back to the same codes, so training and the exported forms see
exactly the checkpoint's ternary weights and scales.
"""
from __future__ import annotations

import numpy as np

from bitnet_jax.hf import layout


def _projection(tensors: dict, i: int, proj: str, multiplies: bool) -> np.ndarray:
  """One projection's latent weight [out, in] (float32)."""
  name = layout.projection_name(i, proj)
  if name not in tensors:
    raise KeyError(f"{name} is missing")
  w = np.asarray(tensors[name])
  if w.dtype != np.uint8:
    return w.astype(np.float32)
  codes = layout.unpack(w)
  scale_name = name[: -len("weight")] + "weight_scale"
  if scale_name not in tensors:
    raise KeyError(f"{scale_name} is missing (packed {name})")
  scale = float(np.asarray(tensors[scale_name], np.float32).reshape(-1)[0])
  alpha = scale if multiplies else 1.0 / scale
  nonzero = np.count_nonzero(codes) / codes.size   # exact, float64
  return (codes * (alpha / nonzero if nonzero else 0.0)).astype(np.float32)


def layer_params(tensors: dict, i: int, heads: int, kv_heads: int,
                 multiplies: bool) -> dict:
  """The parameters of layer i (unstacked)."""
  get = lambda name: np.asarray(tensors[layout.layer_prefix(i) + name],  # noqa: E731
                                np.float32)
  w = {p: _projection(tensors, i, p, multiplies) for p in layout.PROJECTIONS}
  d = w["q_proj"].shape[1]
  e = w["q_proj"].shape[0] // heads
  g = heads // kv_heads
  q = w["q_proj"].T.reshape(d, kv_heads, g, e)
  k = w["k_proj"].T.reshape(d, kv_heads, 1, e)
  v = w["v_proj"].T.reshape(d, kv_heads, 1, e)
  norms = {ours: {"scale": get(f"{hf}.weight")}
           for hf, ours in layout.NORMS.items()}
  return {
      "attn": {"qkv": {"kernel": np.concatenate([q, k, v], axis=2),
                       "norm": norms["qkv"]},
               "o": {"kernel": w["o_proj"].T, "norm": norms["o"]}},
      "ffn": {"up_gate": {"kernel": np.stack([w["up_proj"].T,
                                              w["gate_proj"].T], axis=1),
                          "norm": norms["up_gate"]},
              "down": {"kernel": w["down_proj"].T, "norm": norms["down"]}}}


def rotate_for_v2(params: dict, block_size: int) -> dict:
  """b1.58 -> BitNet v2 keeping the float function: H-BitLinear computes
  (H x) . W' at W_o and W_down; with W' = H W (H orthonormal and symmetric)
  that is x . W, so their latent kernels are rotated along the input axis.
  Quantization then differs (Q_w(H W), Q_x(H x)): as close as it allows."""
  import jax
  from bitnet_jax import rotations
  rotate = jax.vmap(lambda w: rotations.rotate_input_axis(w, block_size))
  out = jax.tree.map(lambda x: x, params)
  for block, site in (("attn", "o"), ("ffn", "down")):
    kernel = params["layers"][block][site]["kernel"]
    out["layers"][block][site]["kernel"] = np.asarray(
        rotate(jax.numpy.asarray(kernel, jax.numpy.float32)))
  return out


def to_params(tensors: dict, hf_config: dict) -> dict:
  """The latent parameter tree (layers stacked for scan) of a checkpoint."""
  over = layout.model_overrides(hf_config)
  heads, kv = over["num_heads"], over["num_kv_heads"] or over["num_heads"]
  multiplies = layout.scale_multiplies(hf_config)
  layers = [layer_params(tensors, i, heads, kv, multiplies)
            for i in range(over["num_layers"])]
  import jax
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  embed = np.asarray(tensors["model.embed_tokens.weight"], np.float32)
  params = {"embed": {"embedding": embed},
            "final_norm": {"scale": np.asarray(tensors["model.norm.weight"],
                                               np.float32)},
            "layers": stacked}
  if not over["tie_embeddings"]:
    head = tensors.get("lm_head.weight")
    if head is None:
      raise KeyError("lm_head.weight is missing and tie_word_embeddings is "
                     "false")
    params["head"] = {"kernel": np.asarray(head, np.float32).T}
  return params
