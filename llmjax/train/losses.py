"""Losses, all computed in float32.

A loss function has the signature `loss_fn(params, batch, apply_fn) -> (loss, aux)` where
`loss` is the scalar to differentiate and `aux` a dict of float32 sums that the train step
adds up over micro-batches (so averages are token-weighted over the whole global batch).
Pretraining and SFT use `next_token_loss` (SFT masks the prompt through `loss_mask`); other
objectives plug into the same train step with their own loss and batch.
"""

import jax
import jax.numpy as jnp

from llmjax.models.transformer import Transformer


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


def next_token_loss(params, batch, apply_fn, loss_chunk: int = 0):
  """Mean next-token cross-entropy over the batch's weighted target tokens.

  batch: inputs/targets/segment_ids/positions [batch, length] int32, loss_mask [batch, length].
  loss_chunk: 0 = one [batch, length, vocab] logits tensor; otherwise `chunked_cross_entropy`
    over pieces of loss_chunk positions (which must divide length). Same value and gradients.
  """
  kw = dict(positions=batch['positions'], segment_ids=batch['segment_ids'])
  if loss_chunk:
    hidden, _ = apply_fn(params, batch['inputs'], return_hidden=True, **kw)
    head = lambda x: apply_fn(params, x, method=Transformer.logits)
    loss_sum, weight_sum = chunked_cross_entropy(head, hidden, batch['targets'],
                                                 batch['loss_mask'], loss_chunk)
  else:
    logits, _ = apply_fn(params, batch['inputs'], **kw)
    loss_sum, weight_sum = cross_entropy(logits, batch['targets'], batch['loss_mask'])
  return loss_sum / jnp.maximum(weight_sum, 1.0), {'loss_sum': loss_sum, 'weight_sum': weight_sum}


def chunked_cross_entropy(head, hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                          chunk: int):
  """`cross_entropy(head(hidden), targets, weights)` without the whole logits tensor.

  With a 128k vocabulary the float32 logits of one 8192-token sequence are 4 GiB, and their
  gradient as much again: most of a long-context step's memory. Here a scan applies the head to
  `chunk` positions at a time under `jax.checkpoint`, so only one [batch, chunk, vocab] block
  lives at once, forward or backward (the backward recomputes it: one more head matmul).

  Args:
    head: x [batch, chunk, embed] -> logits [batch, chunk, vocab] (closes over the params).
    hidden: [batch, length, embed]; targets, weights: [batch, length]; chunk divides length.
  Returns: (sum of weighted token losses, sum of weights), float32 scalars.
  """
  b, t, d = hidden.shape
  if t % chunk:
    raise ValueError(f"train.loss_chunk={chunk} must divide the sequence length {t}.")
  n = t // chunk
  # [batch, length, ...] -> [n, batch, chunk, ...]: the scan runs over the chunk index.
  split = lambda x: jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def one(h, y, w):
    return cross_entropy(head(h), y, w)

  def body(acc, xs):
    loss, weight = one(*xs)
    return (acc[0] + loss, acc[1] + weight), None

  zero = jnp.zeros((), jnp.float32)
  (loss_sum, weight_sum), _ = jax.lax.scan(body, (zero, zero),
                                           (split(hidden), split(targets), split(weights)))
  return loss_sum, weight_sum
