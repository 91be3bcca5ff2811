"""The language-model loss of the model's logits: next-token negative
log-likelihood per position (training, evaluation, inference and the PTQ
calibration all score with it)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits, targets):
  """-log p(target) per position, float32, without materialising log_softmax."""
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target_logit
