"""Checks shared by the SFT and chat data tests."""

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.train.losses import next_token_loss


def assert_loss_ignores_unweighted_targets(params, apply_fn, batch, vocab_size: int) -> None:
  """The train step's loss on a pipeline batch: rewriting the targets where loss_mask is 0
  leaves it bit for bit; rewriting one weighted target changes it."""
  # Jitted: the three batches share one shape, so one compile; op by op, each call compiles
  # hundreds of primitives.
  total = jax.jit(lambda p, b: next_token_loss(p, b, apply_fn).total)
  loss = lambda b: float(total(params, {k: jnp.asarray(v) for k, v in b.items()}))
  mask = batch['loss_mask']
  base = loss(batch)
  unweighted_changed = dict(batch, targets=np.where(mask == 0, (batch['targets'] + 7) % vocab_size,
                                                    batch['targets']))
  assert loss(unweighted_changed) == base
  r, i = np.argwhere(mask == 1)[0]
  weighted_changed = dict(batch, targets=batch['targets'].copy())
  weighted_changed['targets'][r, i] = (weighted_changed['targets'][r, i] + 7) % vocab_size
  assert loss(weighted_changed) != base
