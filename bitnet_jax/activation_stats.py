"""Statistics of one activation tensor, as in the paper's Figures 1-3.

`summarize(x)` takes x[..., C] (tokens x channels) and returns small arrays,
computed in float32 under jit, so a training run can log them without moving
the activations to the host:

  kurtosis          Pearson kurtosis E[(x - mean)^4] / var^2 of all values
                    (3 for a Gaussian; heavy tails and outliers raise it)
  max_over_mean     max |x| / mean |x|
  outlier_share     share of channels whose max |x| exceeds OUTLIER_FACTOR x
                    the median over channels of the channel max |x|
  outlier_mask      [C] which channels those are
  int4_zero_share   share of values whose 4-bit code (Eq. 6, per token) is 0
  max_channel_energy  the largest per-channel share of a token's energy
                    (x_c^2 / |x|^2, averaged over tokens; 1/C if uniform)
  offset_channels   channels that are a token-shared offset: |mean| above
                    OFFSET_FACTOR x their std and > OFFSET_ENERGY / C of the
                    energy (a learned bias channel; harmless at 8 bits, clipped
                    by absmean INT4 when it sits in the rotated domain)
  mean, std, count  of all values
  hist_counts       [BINS] counts over `hist_edges` [BINS + 1], symmetric
                    around 0 out to max |x|

`make_summarizer(model)` runs the model once and summarizes, per layer, the
inputs of W_qkv, W_up/gate, W_o and W_down that the layers sow (stage
`input`: what the activation quantizer sees; `pre_rotation`: an H-BitLinear's
input before the Hadamard). `python -m bitnet_jax.analyze` and the trainer's
`train.analysis_every` hook both use it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bitnet_jax import quant
from bitnet_jax import sites

OUTLIER_FACTOR = 8.0
BINS = 101
SCALARS = ("kurtosis", "max_over_mean", "outlier_share", "int4_zero_share",
           "max_channel_energy", "offset_channels")
OFFSET_FACTOR = 2.0   # |channel mean| over its std: a token-shared offset
OFFSET_ENERGY = 4.0   # ... holding this many times the uniform energy share
STAGES = ("pre_rotation", "input")        # before the Hadamard; quantizer input


def summarize(x: jax.Array) -> dict[str, jax.Array]:
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  mean = jnp.mean(x)
  centred = x - mean
  var = jnp.mean(centred ** 2)
  kurtosis = jnp.mean(centred ** 4) / jnp.maximum(var ** 2, 1e-30)
  absx = jnp.abs(x)
  peak = jnp.max(absx)
  channel_max = jnp.max(absx, axis=0)
  outliers = channel_max > OUTLIER_FACTOR * jnp.median(channel_max)
  codes, _ = quant.int4_codes(x)
  # Per-channel share of each token's energy, averaged over tokens; a channel
  # whose mean dwarfs its spread is a learned offset (a bias in effect).
  energy = x * x
  share = jnp.mean(energy / jnp.maximum(jnp.sum(energy, -1, keepdims=True),
                                        1e-30), axis=0)
  offsets = ((jnp.abs(jnp.mean(x, axis=0)) > OFFSET_FACTOR * jnp.std(x, axis=0))
             & (share > OFFSET_ENERGY / x.shape[-1]))
  edges = jnp.linspace(-1.0, 1.0, BINS + 1) * jnp.maximum(peak, 1e-30)
  counts, _ = jnp.histogram(x, bins=edges)
  return {
      "mean": mean, "std": jnp.sqrt(var), "count": jnp.asarray(x.size, jnp.float32),
      "kurtosis": kurtosis,
      "max_over_mean": peak / jnp.maximum(jnp.mean(absx), 1e-30),
      "outlier_share": jnp.mean(outliers.astype(jnp.float32)),
      "outlier_mask": outliers,
      "int4_zero_share": jnp.mean((codes == 0).astype(jnp.float32)),
      "max_channel_energy": jnp.max(share),
      "offset_channels": jnp.sum(offsets.astype(jnp.float32)),
      "hist_counts": counts,
      "hist_edges": edges,
  }


summarize_jit = jax.jit(summarize)


def site_name(path: tuple) -> tuple[int | None, str, str] | None:
  """(layer, site, stage) of a sown intermediate, or None if not analysed."""
  keys = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
  keys = [k for k in keys if isinstance(k, str)]
  found = sites.locate(keys)
  if found is None or len(found.rest) != 1:
    return None
  stage = {"quant_input": "input", "pre_rotation": "pre_rotation"}.get(
      found.rest[0])
  if stage is None:
    return None
  layer = next((int(k[6:]) for k in found.prefix if k.startswith("layer_")),
               None)
  return layer, found.site.name, stage


def make_summarizer(model, bos_id: int | None = None):
  """(params, tokens [B, L]) -> {"layer{i}/{site}/{stage}": stats}: one
  forward pass that keeps the sown layer inputs, summarized on device."""

  def run(params, tokens):
    bos = None if bos_id is None else tokens == bos_id
    _, state = model.apply({"params": params}, tokens, bos_BL=bos,
                           mutable=["intermediates"])
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    for path, x in flat:
      name = site_name(path)
      if name is None:
        continue
      layer, site, stage = name
      if layer is None:  # scanned layers: leading axis is the layer
        stats = jax.vmap(summarize)(x)
        for i in range(x.shape[0]):
          out[f"layer{i}/{site}/{stage}"] = jax.tree.map(lambda s: s[i], stats)
      else:
        out[f"layer{layer}/{site}/{stage}"] = summarize(x)
    return out

  return jax.jit(run)
