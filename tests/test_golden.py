"""The golden one-step guard: the library's loss and gradients (float32) reproduces
loss and gradient norms computed once by an independent float64 path
(tests/golden_one_step.py; values in tests/golden/one_step.json).

Measured agreement: ~1e-7 relative on loss and gradient norm in every case;
the tolerances leave room for one quantizer level rounding the other way in
float32. A refactor that moves code must leave these numbers alone. A parameter
renamed or a projection rewired fails here by name.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bitnet_jax.data.batch import Batch
from bitnet_jax import defaults
from bitnet_jax.model import ModelConfig, Transformer
from bitnet_jax.training import train_step as step_lib

import golden_one_step as golden

with open(golden.GOLDEN) as f:
  GOLDEN = json.load(f)


def path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


@pytest.mark.parametrize("case", sorted(golden.CASES))
def test_one_step_equals_golden(case):
  check_one_step(case)


@pytest.mark.parametrize("case,kernel", [("v2_a8", "interpret"),
                                         ("v2_a4", "interpret"),
                                         ("v2_a4", "triton_interpret")])
def test_one_step_with_the_fused_input_kernel_equals_golden(case, kernel):
  """The same golden values through the integer matmul and the fused
  RMSNorm -> Hadamard -> quantize kernel (kernels/h_input.py, the TPU or
  the GPU one, run by Pallas' interpreter): W_o and W_down take it."""
  check_one_step(case, train_matmul="int8", input_kernel=kernel)


def check_one_step(case, **quant):
  variant, bits, q_bits, kv_bits, weight_scale = golden.CASES[case]
  # Through the config groups users write (stable across refactors).
  config = defaults.base_config()
  config.model.update(golden.SHAPE, seq_len=golden.LENGTH, variant=variant,
                      norm_eps=golden.NORM_EPS, scan_layers=False)
  config.quant.update(act_bits=bits, q_bits=q_bits or 0, kv_bits=kv_bits or 0,
                      topk_ratio_o=golden.TOPK_O, weight_scale=weight_scale,
                      **quant)
  cfg = ModelConfig.from_config(config)
  model = Transformer(cfg)
  batch = Batch(jnp.asarray(golden.make_batch()))
  shapes = nn.meta.unbox(jax.eval_shape(
      model.init, jax.random.PRNGKey(0), batch.inputs)["params"])
  values = golden.make_params(variant)
  names = {path_name(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(shapes)[0]}
  assert names == set(values), ("parameter paths changed",
                                sorted(names ^ set(values)))

  def fill(path, leaf):
    value = values[path_name(path)]
    assert value.shape == leaf.shape, (path_name(path), value.shape, leaf.shape)
    return jnp.asarray(value)
  params = jax.tree_util.tree_map_with_path(fill, shapes)

  (loss, _), grads = jax.jit(jax.value_and_grad(step_lib.loss_fn, has_aux=True),
                             static_argnums=2)(params, batch, model)
  want = GOLDEN[case]
  np.testing.assert_allclose(float(loss), want["loss"], rtol=1e-5)
  np.testing.assert_allclose(float(optax.global_norm(grads)), want["grad_norm"],
                             rtol=1e-4)
  got = {path_name(p): float(jnp.linalg.norm(g)) for p, g in
         jax.tree_util.tree_flatten_with_path(grads)[0]}
  assert set(got) == set(want["leaf_grad_norms"])
  for name, norm in want["leaf_grad_norms"].items():
    np.testing.assert_allclose(got[name], norm, rtol=1e-3, atol=1e-6,
                               err_msg=name)
