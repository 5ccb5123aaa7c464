"""The train and eval steps: pure functions of (state, batch), jitted by the loop with
shardings and a donated state."""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from llmjax.models import lora
from llmjax.train.state import TrainState


def make_train_step(apply_fn: Callable, loss_fn: Callable, optimizer: optax.GradientTransformation,
                    grad_accum: int = 1, adapters_only: bool = False):
  """Returns train_step(state, batch) -> (state, metrics).

  adapters_only (LoRA): differentiate and update only the `lora.ADAPTER_LEAVES`; the base
  weights are constants of the step, so no weight gradients or Adam moments exist for them.

  batch arrays have a leading global-batch dim; with `grad_accum` > 1 it is split into that many
  micro-batches whose gradients are summed in float32 by a `lax.scan` (one micro-batch of
  activations alive at a time), then scaled so the update equals one full-batch step.
  """

  def grads_of(trainable, frozen, micro):
    full = lambda t: lora.combine(t, frozen) if adapters_only else t
    (loss, aux), grads = jax.value_and_grad(
        lambda t: loss_fn(full(t), micro, apply_fn), has_aux=True)(trainable)
    # Scale the mean-loss gradient back to a sum over tokens so micro-batches combine exactly.
    grads = jax.tree.map(lambda g: g.astype(jnp.float32) * aux['weight_sum'], grads)
    return grads, aux

  def train_step(state: TrainState, batch):
    trainable, frozen = lora.split(state.params) if adapters_only else (state.params, None)
    if grad_accum == 1:
      grads, aux = grads_of(trainable, frozen, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

      def body(acc, mb):
        g, a = grads_of(trainable, frozen, mb)
        return jax.tree.map(jnp.add, acc, (g, a)), None

      zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable),
               {'loss_sum': jnp.zeros((), jnp.float32), 'weight_sum': jnp.zeros((), jnp.float32)})
      (grads, aux), _ = jax.lax.scan(body, zeros, micro)
    denom = jnp.maximum(aux['weight_sum'], 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    params = lora.combine(trainable, frozen) if adapters_only else trainable
    metrics = {'loss': aux['loss_sum'] / denom, 'tokens': aux['weight_sum'],
               'grad_norm': optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(apply_fn: Callable, loss_fn: Callable):
  """Returns eval_step(params, batch) -> {'loss_sum', 'weight_sum'} (sums, to average over batches)."""

  def eval_step(params, batch):
    _, aux = loss_fn(params, batch, apply_fn)
    return aux

  return eval_step
