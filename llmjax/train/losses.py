"""Losses, all computed in float32.

A loss function has the signature `loss_fn(params, batch, apply_fn) -> (loss, aux)` where
`loss` is the scalar to differentiate and `aux` a dict of float32 sums that the train step
adds up over micro-batches (so averages are token-weighted over the whole global batch).
Pretraining and SFT use `next_token_loss` (SFT masks the prompt through `loss_mask`); other
objectives plug into the same train step with their own loss and batch.
"""

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Weighted token cross-entropy.

  Args:
    logits: [batch, length, vocab] (any float dtype; upcast to float32).
    targets: [batch, length] int token ids.
    weights: [batch, length] float; 0 excludes a position (padding, prompt tokens).
  Returns: (sum of weighted token losses, sum of weights), both float32 scalars.
  """
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  token_loss = logz - target_logit  # [batch, length]
  weights = weights.astype(jnp.float32)
  return jnp.sum(token_loss * weights), jnp.sum(weights)


def next_token_loss(params, batch, apply_fn):
  """Mean next-token cross-entropy over the batch's weighted target tokens.

  batch: inputs/targets/segment_ids/positions [batch, length] int32, loss_mask [batch, length].
  """
  logits, _ = apply_fn(params, batch['inputs'], positions=batch['positions'],
                       segment_ids=batch['segment_ids'])
  loss_sum, weight_sum = cross_entropy(logits, batch['targets'], batch['loss_mask'])
  return loss_sum / jnp.maximum(weight_sum, 1.0), {'loss_sum': loss_sum, 'weight_sum': weight_sum}
