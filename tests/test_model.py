"""The decoder against a float64 numpy reference written out from the paper."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import defaults
from bitnet_jax.model import (ModelConfig, Transformer, count_params,
                              param_shapes)

from np_reference import (np_hadamard, np_heads, np_int4, np_int8, np_rmsnorm,
                          np_ternary)

VARIANTS = ["fp", "b1.58", "v2", "a4.8"]


def small_cfg(**kw):
  base = dict(vocab_size=97, d_model=64, d_ff=128, num_heads=4, num_kv_heads=2,
              num_layers=2, seq_len=16, scan_layers=False)
  base.update(kw)
  return ModelConfig(**base)


def init(cfg, tokens):
  params = Transformer(cfg).init(jax.random.PRNGKey(0), tokens)["params"]
  params = nn.meta.unbox(params)
  # Non-trivial norm scales, so a norm wired to the wrong place shows.
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)
      if path[-1].key == "scale" else v, params)


def tokens_for(cfg, batch=2, length=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(
      0, cfg.vocab_size, (batch, length)), jnp.int32)


# ---------------------------------------------------------------------------
# Reference (float64 numpy): every rule of the paper written out once more.


def ref_weights(w, projections):
  """Eq. 1-2 applied to each projection (an index expression) on its own."""
  out = np.empty_like(w)
  for sl in projections:
    codes, alpha, _ = np_ternary(w[sl])
    out[sl] = codes * alpha
  return out


def ref_linear(x, p, *, bits, rotate, topk=None, eps=1e-5,
               projections=(np.s_[...],)):
  w = np.asarray(p["kernel"], np.float64)
  if bits is None:  # fp baseline: no own norm, float weights
    return x @ w.reshape(w.shape[0], -1)
  h = np_rmsnorm(x, p["norm"]["scale"], eps)
  if rotate:
    h = h @ np_hadamard(h.shape[-1])
  if topk is not None:
    k = int(np.ceil(topk * h.shape[-1]))
    kth = -np.sort(-np.abs(h), axis=-1)[..., k - 1:k]
    h = np.where(np.abs(h) >= kth, h, 0.0)
  codes, scale, _ = (np_int8 if bits == 8 else np_int4)(h)
  return (codes * scale) @ ref_weights(w, projections).reshape(w.shape[0], -1)


def ref_rope(x, theta=10000.0):
  length, half = x.shape[1], x.shape[-1] // 2
  freq = theta ** (-np.arange(half) / half)
  ang = np.arange(length)[None, :, None, None] * freq
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                         x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def ref_qkv_quant(cfg, q, k, v):
  """Post-RoPE absmax onto unsigned levels; K/V of BOS (position 0) at 8 bits."""
  def fake(x, bits):
    codes, scale, gamma, _ = np_heads(x, bits)
    return codes * scale - gamma
  if cfg.q_bits:
    q = fake(q, cfg.q_bits)
  if cfg.kv_bits:
    k8, v8 = fake(k, 8), fake(v, 8)
    k, v = fake(k, cfg.kv_bits), fake(v, cfg.kv_bits)
    k[:, 0], v[:, 0] = k8[:, 0], v8[:, 0]
  return q, k, v


def ref_forward(cfg, params, tokens):
  v = cfg.variant
  bits_in = None if v == "fp" else (4 if (v == "a4.8" and cfg.act_bits == 4)
                                    else cfg.act_bits)
  bits_mid = None if v == "fp" else (8 if v == "a4.8" else cfg.act_bits)
  topk_o = cfg.topk_ratio_o if (v == "a4.8" and cfg.act_bits == 4) else None
  rotate = v == "v2"  # Hadamard at the W_o and W_down inputs, nowhere else
  x = np.asarray(params["embed"]["embedding"], np.float64)[np.asarray(tokens)]
  b, length = tokens.shape
  kh, e = cfg.kv_heads, cfg.head_dim
  g = cfg.num_heads // kh
  causal = np.tril(np.ones((length, length), bool))
  relu2 = (cfg.activation or ("relu2" if v == "a4.8" else "swiglu")) == "relu2"
  # W_q, W_k, W_v and W_up, W_gate: one absmean each (BitNet b1.58)
  qkv_projections = up_gate_projections = (np.s_[...],)
  if cfg.weight_scale == "projection":
    qkv_projections = (np.s_[:, :, :g], np.s_[:, :, g:g + 1],
                       np.s_[:, :, g + 1:])
    up_gate_projections = (np.s_[:, :1], np.s_[:, 1:])
  for i in range(cfg.num_layers):
    p = params[f"layer_{i}"]
    h = np_rmsnorm(x, p["attn_norm"]["scale"], 1e-5) if v == "fp" else x
    qkv = ref_linear(h, p["attn"]["qkv"], bits=bits_in, rotate=False,
                     projections=qkv_projections)
    qkv = qkv.reshape(b, length, kh, g + 2, e)
    q = ref_rope(qkv[:, :, :, :g].reshape(b, length, kh * g, e))
    k = ref_rope(qkv[:, :, :, g])
    val = qkv[:, :, :, g + 1]
    q, k, val = ref_qkv_quant(cfg, q, k, val)
    out = np.zeros((b, length, cfg.num_heads, e))
    for head in range(cfg.num_heads):
      s = np.einsum("bqe,bke->bqk", q[:, :, head], k[:, :, head // g]) / np.sqrt(e)
      s = np.where(causal, s, -np.inf)
      pr = np.exp(s - s.max(-1, keepdims=True))
      pr /= pr.sum(-1, keepdims=True)
      out[:, :, head] = np.einsum("bqk,bke->bqe", pr, val[:, :, head // g])
    x = x + ref_linear(out.reshape(b, length, -1), p["attn"]["o"], bits=bits_mid,
                       rotate=rotate, topk=topk_o)
    h = np_rmsnorm(x, p["ffn_norm"]["scale"], 1e-5) if v == "fp" else x
    ug = ref_linear(h, p["ffn"]["up_gate"], bits=bits_in, rotate=False,
                    projections=up_gate_projections)
    ug = ug.reshape(b, length, 2, cfg.d_ff)
    up, gate = ug[:, :, 0], ug[:, :, 1]
    act = np.maximum(gate, 0) ** 2 if relu2 else gate / (1 + np.exp(-gate))
    x = x + ref_linear(act * up, p["ffn"]["down"], bits=bits_mid, rotate=rotate)
  x = np_rmsnorm(x, params["final_norm"]["scale"], 1e-5)
  return x @ np.asarray(params["head"]["kernel"], np.float64)


def rel(a, b):
  return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def per_position_rel(a, b):
  return (np.linalg.norm(np.asarray(a, np.float64) - b, axis=-1) /
          np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("variant,bits,qkv,extra", [
    ("fp", 8, None, {}), ("b1.58", 8, None, {}), ("v2", 8, None, {}),
    ("v2", 4, None, {}), ("a4.8", 8, None, {}), ("a4.8", 4, None, {}),
    ("v2", 8, (4, 4), {}), ("v2", 4, (4, 3), {}),
    ("b1.58", 8, None, {"activation": "relu2"}),
    ("v2", 4, None, {"weight_scale": "tensor"})])
def test_model_equals_reference(variant, bits, qkv, extra):
  q_bits, kv_bits = qkv or (0, 0)
  cfg = small_cfg(variant=variant, act_bits=bits, q_bits=q_bits, kv_bits=kv_bits,
                  **extra)
  tokens = tokens_for(cfg)
  params = init(cfg, tokens)
  logits = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)
  ref = ref_forward(cfg, params, tokens)
  assert logits.shape == ref.shape and logits.dtype == jnp.float32
  if not qkv:
    assert rel(logits, ref) < 2e-3
  else:
    # 4-bit Q/K/V amplify float32-vs-float64 noise: an 8-bit activation level
    # that rounds the other way upstream can move a K/V element across a
    # 4-bit boundary, changing that token's later positions by ~1%. Most
    # positions match exactly; every one is far nearer than unquantized states.
    plain = jax.jit(Transformer(cfg.replace(q_bits=0, kv_bits=0)).apply)
    plain = np.asarray(plain({"params": params}, tokens), np.float64)
    per, off = per_position_rel(logits, ref), per_position_rel(plain, ref)
    assert np.mean(per < 2e-3) >= 1 / 2, per
    assert np.all((per < 2e-3) | (per < 0.3 * off)), (per, off)
    assert rel(plain, ref) > 5e-2  # the attention-state quantizers are on
  if variant == "v2" and not qkv:
    # The reference without its Hadamards is far away: the rotation matters,
    # and is placed exactly at the W_o and W_down inputs.
    assert rel(logits, ref_forward(cfg.replace(variant="b1.58"), params,
                                   tokens)) > 2e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
  cfg = small_cfg(variant=variant)
  tokens = tokens_for(cfg)
  params = init(cfg, tokens)
  fwd = jax.jit(Transformer(cfg).apply)
  base = fwd({"params": params}, tokens)
  t = 7
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
  out = fwd({"params": params}, changed)
  np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
  assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_config_forward_and_grad(variant):
  config = defaults.tiny_config()
  config.model.variant = variant
  cfg = ModelConfig.from_config(config).replace(num_layers=2)
  tokens = tokens_for(cfg, batch=2, length=32)
  params = init(cfg, tokens)
  model = Transformer(cfg)

  def loss(p):
    logits = model.apply({"params": p}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value) and abs(value - np.log(cfg.vocab_size)) < 1.0
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.isfinite(np.asarray(g)).all(), path
    if path[-1].key == "kernel":  # straight-through: every kernel learns
      assert np.abs(np.asarray(g)).max() > 0, path


def test_scan_equals_unrolled_and_remat():
  cfg = small_cfg(variant="v2", num_layers=3)
  tokens = tokens_for(cfg)
  params = init(cfg, tokens)
  layers = [params.pop(f"layer_{i}") for i in range(3)]
  stacked = dict(params, layers=jax.tree.map(lambda *a: jnp.stack(a), *layers))
  unrolled = dict(params, **{f"layer_{i}": l for i, l in enumerate(layers)})
  ref = Transformer(cfg).apply({"params": unrolled}, tokens)
  for remat in ("none", "full", "dots"):
    scan_cfg = cfg.replace(scan_layers=True, remat=remat)
    out = jax.jit(Transformer(scan_cfg).apply)({"params": stacked}, tokens)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  shapes = param_shapes(cfg.replace(scan_layers=True))
  assert shapes["layers"]["attn"]["qkv"]["kernel"].shape == (3, 64, 2, 4, 16)


def test_segments_isolate_packed_documents():
  cfg = small_cfg(variant="v2")
  a, b = tokens_for(cfg, 1, 5, seed=1), tokens_for(cfg, 1, 7, seed=2)
  params = init(cfg, a)
  apply = jax.jit(Transformer(cfg).apply)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 7])
  pos = jnp.asarray([list(range(5)) + list(range(7))])
  out = apply({"params": params}, packed, pos, seg)
  np.testing.assert_allclose(out[:, 5:], apply({"params": params}, b),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[:, :5], apply({"params": params}, a),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
  cfg = small_cfg(variant="v2")
  tokens = tokens_for(cfg)
  params = init(cfg, tokens)
  f32 = Transformer(cfg).apply({"params": params}, tokens)
  bf16 = Transformer(cfg.replace(dtype="bfloat16")).apply({"params": params},
                                                          tokens)
  assert bf16.dtype == jnp.float32
  assert rel(bf16, np.asarray(f32, np.float64)) < 5e-2


@pytest.mark.parametrize("size", sorted(defaults.PAPER_SIZES))
def test_paper_config_parameter_counts(size):
  config = defaults.paper_config(size)
  cfg = ModelConfig.from_config(config)
  shapes = param_shapes(cfg)  # jax.eval_shape: nothing allocated
  d, f, n = cfg.d_model, cfg.d_ff, cfg.num_layers
  table8 = n * (4 * d * d + 3 * d * f)  # W_qkv + W_o + W_up,gate + W_down
  got = count_params(shapes, non_embedding=True)
  assert abs(got - table8) / table8 < 0.03, (got, table8)
  assert count_params(shapes) - got == 2 * cfg.vocab_size * d


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="model.variant"):
    small_cfg(variant="bitnet")
  with pytest.raises(ValueError, match="model.num_kv_heads"):
    small_cfg(num_kv_heads=3)
  with pytest.raises(ValueError, match="model.d_ff.*nearest supported"):
    small_cfg(d_ff=100)
  small_cfg(d_ff=100, variant="b1.58")  # no Hadamard: any width is fine
  with pytest.raises(ValueError, match="model.act_bits"):
    small_cfg(act_bits=2)
