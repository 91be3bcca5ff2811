"""Golden values of one training step, from an independent float64 path.

Run once, in its own process (it turns on float64 for JAX):

  python tests/golden_one_step.py      # writes tests/golden/one_step.json

The forward pass is the paper written out again in `jax.numpy` float64 (it
imports nothing from bitnet_jax); the straight-through estimator is the
textbook `x + stop_gradient(q(x) - x)`: the gradient passes every quantizer
(and the top-K mask) unchanged and never flows through a scale. The
parameters and the batch come from `make_params` / `make_batch` (numpy, seed
0), which the test (tests/test_golden.py) calls again to feed the library.
Kernels are drawn at unit-variance-preserving scales and the head is
sharpened, so the loss is far from log(V) and a wiring mistake shows.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

SHAPE = dict(vocab_size=97, d_model=64, d_ff=128, num_heads=4, num_kv_heads=2,
             num_layers=2)
BATCH, LENGTH = 2, 12
EPS = 1e-5           # the quantizers' epsilon (np_reference.EPS)
NORM_EPS = 1e-5      # RMSNorm epsilon (the library's default model.norm_eps)
# name -> (variant, act_bits, q_bits, kv_bits, weight_scale)
CASES = {
    "fp": ("fp", 8, None, None, "projection"),
    "b1.58_a8": ("b1.58", 8, None, None, "projection"),
    "v2_a8": ("v2", 8, None, None, "projection"),
    "v2_a4": ("v2", 4, None, None, "projection"),
    "a4.8_a4": ("a4.8", 4, None, None, "projection"),
    "v2_a4_q4_kv4": ("v2", 4, 4, 4, "projection"),
    "v2_a8_tensor_scale": ("v2", 8, None, None, "tensor"),
}
TOPK_O = 0.5  # a4.8's W_o input share (the library's default)
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "one_step.json")


def make_params(variant: str) -> dict[str, np.ndarray]:
  """Parameters by path ('layer_0/attn/qkv/kernel'), float32, seed 0."""
  rng = np.random.default_rng(0)
  d, f, v = SHAPE["d_model"], SHAPE["d_ff"], SHAPE["vocab_size"]
  kh = SHAPE["num_kv_heads"]
  e = d // SHAPE["num_heads"]
  g = SHAPE["num_heads"] // kh

  def normal(shape, fan_in, gain=1.0):
    return (rng.standard_normal(shape) * gain / math.sqrt(fan_in)).astype(
        np.float32)

  def scale(n):
    return rng.uniform(0.5, 1.5, (n,)).astype(np.float32)

  p = {"embed/embedding": rng.standard_normal((v, d)).astype(np.float32)}
  linears = {"attn/qkv": ((d, kh, g + 2, e), d), "attn/o": ((d, d), d),
             "ffn/up_gate": ((d, 2, f), d), "ffn/down": ((f, d), f)}
  for i in range(SHAPE["num_layers"]):
    if variant == "fp":
      p[f"layer_{i}/attn_norm/scale"] = scale(d)
      p[f"layer_{i}/ffn_norm/scale"] = scale(d)
    for name, (shape, fan_in) in linears.items():
      p[f"layer_{i}/{name}/kernel"] = normal(shape, fan_in)
      if variant != "fp":
        p[f"layer_{i}/{name}/norm/scale"] = scale(shape[0])
  p["final_norm/scale"] = scale(d)
  p["head/kernel"] = normal((d, v), d, gain=4.0)
  return p


def make_batch() -> np.ndarray:
  """int32 tokens [B, L + 1]: position t predicts t + 1."""
  rng = np.random.default_rng(1)
  return rng.integers(0, SHAPE["vocab_size"], (BATCH, LENGTH + 1)).astype(
      np.int32)


def reference(case: str):
  """(loss, {path: gradient}) in float64."""
  import jax
  jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp

  variant, bits, q_bits, kv_bits, weight_scale = CASES[case]
  sg = jax.lax.stop_gradient

  def ste(x, q):
    return x + sg(q(x) - x)

  def round_clip(x, lo, hi):
    return jnp.clip(jnp.round(x), lo, hi)

  def ternary(w):  # Eq. 1-2
    alpha = jnp.mean(jnp.abs(w))
    return round_clip(w / (alpha + EPS), -1, 1) * alpha

  def int8(x):  # Eq. 5
    gamma = jnp.max(jnp.abs(x), -1, keepdims=True)
    return round_clip(127 / (gamma + EPS) * x, -128, 127) * gamma / 127

  def int4(x):  # Eq. 6
    beta = jnp.mean(jnp.abs(x), -1, keepdims=True)
    return (round_clip(math.sqrt(7) / (beta + EPS) * x, -8, 7) * beta /
            math.sqrt(7))

  def topk(x, ratio):
    k = math.ceil(ratio * x.shape[-1])
    kth = -jnp.sort(-jnp.abs(x), -1)[..., k - 1:k]
    return jnp.where(jnp.abs(x) >= kth, x, 0.0)

  def heads(x, b):  # post-RoPE absmax onto unsigned b-bit levels
    gamma = jnp.max(jnp.abs(x), -1, keepdims=True)
    step = 2 * gamma / (2 ** b - 1)
    return round_clip((x + gamma) / (step + EPS), 0, 2 ** b - 1) * step - gamma

  def quantize_groups(m, groups):
    """Each group (a projection, possibly scattered over column blocks)
    gets the absmean of all its columns."""
    out = jnp.zeros_like(m)
    for blocks in groups:
      cols = np.concatenate([np.arange(a, b) for a, b in blocks])
      out = out.at[:, cols].set(ternary(m[:, cols]))
    return out

  def rmsnorm(x, s):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + NORM_EPS) * s

  def hadamard(n):
    i = np.arange(n)
    signs = 1.0 - 2.0 * (np.bitwise_count(i[:, None] & i[None, :]) & 1)
    return jnp.asarray(signs / math.sqrt(n))

  def rope(x):
    length, half = x.shape[1], x.shape[-1] // 2
    ang = jnp.arange(length)[None, :, None, None] * 10000.0 ** (
        -jnp.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang),
                            x2 * jnp.cos(ang) + x1 * jnp.sin(ang)], -1)

  def linear(x, p, prefix, in_bits, rotate=False, ratio=None):
    w = p[prefix + "/kernel"]
    w2 = w.reshape(w.shape[0], -1)  # columns: the projections side by side
    projections = [(0, w2.shape[1])]
    if weight_scale == "projection" and prefix.endswith("/qkv"):
      # [D, K, G + 2, E] -> columns of W_q, W_k and W_v
      q_cols = [(k * (g + 2) * e + j * e, k * (g + 2) * e + (j + 1) * e)
                for k in range(kh) for j in range(g)]
      k_cols = [(k * (g + 2) * e + g * e, k * (g + 2) * e + (g + 1) * e)
                for k in range(kh)]
      v_cols = [(k * (g + 2) * e + (g + 1) * e, (k + 1) * (g + 2) * e)
                for k in range(kh)]
      groups = [q_cols, k_cols, v_cols]
    elif weight_scale == "projection" and prefix.endswith("/up_gate"):
      f = w.shape[-1]
      groups = [[(0, f)], [(f, 2 * f)]]  # W_up, W_gate
    else:
      groups = [projections]
    if in_bits is None:
      return x @ w2
    h = rmsnorm(x, p[prefix + "/norm/scale"])
    if rotate:
      h = h @ hadamard(h.shape[-1])  # row vectors: x H^T, H symmetric
    act = int8 if in_bits == 8 else int4
    h = ste(h, (lambda z: act(topk(z, ratio))) if ratio else act)
    return h @ ste(w2, lambda m: quantize_groups(m, groups))

  b, length = BATCH, LENGTH
  d = SHAPE["d_model"]
  kh = SHAPE["num_kv_heads"]
  e = d // SHAPE["num_heads"]
  g = SHAPE["num_heads"] // kh
  fp = variant == "fp"
  a48_4 = variant == "a4.8" and bits == 4
  bits_in = None if fp else bits
  bits_mid = None if fp else (8 if variant == "a4.8" else bits)
  rotate = variant == "v2"
  tokens = jnp.asarray(make_batch())
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  causal = jnp.tril(jnp.ones((length, length), bool))

  def loss_fn(p):
    x = p["embed/embedding"][inputs]
    for i in range(SHAPE["num_layers"]):
      pre = f"layer_{i}"
      h = rmsnorm(x, p[pre + "/attn_norm/scale"]) if fp else x
      qkv = linear(h, p, pre + "/attn/qkv", bits_in).reshape(b, length, kh,
                                                             g + 2, e)
      q = rope(qkv[:, :, :, :g].reshape(b, length, kh * g, e))
      k = rope(qkv[:, :, :, g])
      v = qkv[:, :, :, g + 1]
      if q_bits:
        q = ste(q, lambda z: heads(z, q_bits))
      if kv_bits:  # BOS (position 0) keeps 8 bits
        k = ste(k, lambda z: jnp.concatenate(
            [heads(z[:, :1], 8), heads(z[:, 1:], kv_bits)], 1))
        v = ste(v, lambda z: jnp.concatenate(
            [heads(z[:, :1], 8), heads(z[:, 1:], kv_bits)], 1))
      k_h = jnp.repeat(k, g, axis=2)  # head n reads kv head n // G
      v_h = jnp.repeat(v, g, axis=2)
      s = jnp.einsum("bqne,bkne->bnqk", q, k_h) / math.sqrt(e)
      s = jnp.where(causal, s, -jnp.inf)
      att = jnp.einsum("bnqk,bkne->bqne", jax.nn.softmax(s, -1), v_h)
      x = x + linear(att.reshape(b, length, d), p, pre + "/attn/o", bits_mid,
                     rotate, TOPK_O if a48_4 else None)
      h = rmsnorm(x, p[pre + "/ffn_norm/scale"]) if fp else x
      ug = linear(h, p, pre + "/ffn/up_gate", bits_in).reshape(b, length, 2, -1)
      up, gate = ug[:, :, 0], ug[:, :, 1]
      act = (jnp.square(jax.nn.relu(gate)) if variant == "a4.8" else
             gate * jax.nn.sigmoid(gate))
      x = x + linear(act * up, p, pre + "/ffn/down", bits_mid, rotate)
    logits = rmsnorm(x, p["final_norm/scale"]) @ p["head/kernel"]
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, targets[..., None], -1)[..., 0]
    return jnp.mean(nll)

  params = {k: jnp.asarray(v, jnp.float64) for k, v in
            make_params(variant).items()}
  loss, grads = jax.value_and_grad(loss_fn)(params)
  return float(loss), {k: np.asarray(v) for k, v in grads.items()}


def main():
  golden = {}
  for case in CASES:
    loss, grads = reference(case)
    golden[case] = {
        "loss": loss,
        "grad_norm": math.sqrt(sum(float(np.sum(v * v)) for v in grads.values())),
        "leaf_grad_norms": {k: float(np.linalg.norm(v)) for k, v in
                            sorted(grads.items())},
    }
    print(f"{case}: loss {loss:.6f}, grad norm {golden[case]['grad_norm']:.6f}")
  os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
  with open(GOLDEN, "w") as f:
    json.dump(golden, f, indent=1, sort_keys=True)
  print(f"wrote {GOLDEN}")


if __name__ == "__main__":
  sys.exit(main())
