"""The projection registry against the model's real trees: every quantized
projection is found where the model puts it, and nothing else is."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from bitnet_jax import sites
from bitnet_jax.training import optimizer
from bitnet_jax.model import ModelConfig, Transformer, param_shapes


def cfg(**kw):
  base = dict(vocab_size=64, d_model=32, d_ff=64, num_heads=2, num_layers=2,
              seq_len=8)
  base.update(kw)
  return ModelConfig(**base)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("variant", ["fp", "v2"])
def test_registry_finds_every_projection_kernel(scan, variant):
  params = param_shapes(cfg(scan_layers=scan, variant=variant))
  found = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = sites.path_keys(path)
    hit = sites.locate(keys)
    if hit and hit.rest == (sites.KERNEL,):
      found.setdefault(hit.prefix, []).append(hit.site.name)
  layers = [("layers",)] if scan else [("layer_0",), ("layer_1",)]
  assert sorted(found) == sorted(layers)
  for names in found.values():
    assert sorted(names) == sorted(s.name for s in sites.SITES)


def test_weight_decay_mask_is_projection_and_head_kernels():
  params = param_shapes(cfg(scan_layers=False))
  mask = optimizer.decay_mask(params)
  decayed = {"/".join(sites.path_keys(p)) for p, m in
             jax.tree_util.tree_flatten_with_path(mask)[0] if m}
  want = {f"layer_{i}/{s.block}/{s.name}/kernel" for i in range(2)
          for s in sites.SITES} | {"head/kernel"}
  assert decayed == want


def test_sown_inputs_are_located():
  c = cfg(scan_layers=False)
  tokens = jnp.zeros((1, 8), jnp.int32)
  model = Transformer(c)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
  _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
  stages = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
    keys = [k for k in sites.path_keys(path) if not k.startswith("[")]
    hit = sites.locate(keys)
    if keys[0] == sites.HEAD:
      continue
    assert hit is not None, keys
    stages.add((hit.prefix, hit.site.name, hit.rest))
  # v2: W_o and W_down record their input before the Hadamard too
  assert (("layer_1",), "down", ("pre_rotation",)) in stages
  assert (("layer_0",), "qkv", ("quant_input",)) in stages
  assert (("layer_0",), "qkv", ("pre_rotation",)) not in stages


def test_locate_ignores_other_paths():
  assert sites.locate(("embed", "embedding")) is None
  assert sites.locate(("layers", "ffn", "qkv", "kernel")) is None  # wrong block
  assert not sites.is_weight_matrix(("layer_0", "attn", "o", "norm", "scale"))
