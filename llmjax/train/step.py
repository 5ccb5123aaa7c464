"""The train and eval steps: pure functions of (state, batch), jitted by the loop with
shardings and a donated state. Every objective (pretraining, SFT, and later DPO, reward models,
RL) runs through this one step; they differ in the loss function and the batch."""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from llmjax.train import losses
from llmjax.train.state import TrainState, combine, split


def _loss(loss_fn: Callable, params, batch, apply_fn, ref_params):
  """loss_fn's value; a loss that needs a reference model (DPO, KTO) also gets its params."""
  if ref_params is None:
    return loss_fn(params, batch, apply_fn)
  return loss_fn(params, batch, apply_fn, ref_params=ref_params)


def make_train_step(apply_fn: Callable, loss_fn: Callable, optimizer: optax.GradientTransformation,
                    grad_accum: int = 1, trainable=None, reference_fn: Callable | None = None,
                    dropout: bool = False):
  """Returns train_step(state, batch, ref_params=None) -> (state, metrics).

  loss_fn(params, batch, apply_fn) -> `losses.LossOutput` (sums; see `llmjax.train.losses`);
    with a reference model, loss_fn(params, batch, apply_fn, ref_params=...).
  trainable: a pytree of bools shaped like the params (`state.trainable_mask`), or None = all.
    Only the True leaves are differentiated and updated (and have optimizer state); the others
    (a LoRA run's frozen base) are constants of the step, so no gradients exist for them.
  ref_params: a frozen reference model's params (another checkpoint, sharded like the policy;
    never differentiated, no optimizer state), passed to the loss as they are.
  reference_fn: or params -> the reference's params, computed inside the step from the current
    params (`lora.disable`: the base with adapters off, which shares the base's buffers, so no
    second copy of the model exists); its output is not differentiated.
  dropout: the model has dropout (model.lora_dropout > 0): the loss's apply_fn calls get
    `dropout_rng=`, a key from state.rng folded with the step (and the micro-batch index).

  batch arrays have a leading global-batch dim; with `grad_accum` > 1 it is split into that many
  micro-batches by a `lax.scan` (one micro-batch of activations alive at a time) whose gradients
  of `total` and whose LossOutputs are summed in float32, then divided once by the summed
  `weight`: the update is exactly that of one full-batch step, whatever the loss averages over.
  metrics: `losses.reduce_output` of the summed LossOutput ('loss', 'weight', the loss's own
  metrics) and 'grad_norm'.
  """

  def grads_of(train, frozen, micro, ref, key):
    apply = apply_fn if key is None else functools.partial(apply_fn, dropout_rng=key)

    def total(t):
      out = _loss(loss_fn, combine(t, frozen), micro, apply, ref)
      return out.total, out
    grads, out = jax.grad(total, has_aux=True)(train)
    return jax.tree.map(lambda g: g.astype(jnp.float32), grads), out

  def train_step(state: TrainState, batch, ref_params=None):
    if reference_fn is not None:
      ref_params = jax.lax.stop_gradient(reference_fn(state.params))
    train, frozen = split(state.params, trainable)
    key = (jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
           if dropout else None)
    if grad_accum == 1:
      grads, out = grads_of(train, frozen, batch, ref_params, key)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
      first = jax.tree.map(lambda x: x[0], micro)
      # The accumulator has the loss's own structure (its metrics included), found by tracing.
      out_shape = jax.eval_shape(lambda: _loss(loss_fn, state.params, first, apply_fn,
                                               ref_params))
      zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train),
               losses.zeros_like_output(out_shape))

      def body(acc, xs):
        mb, i = xs
        mb_key = None if key is None else jax.random.fold_in(key, i)
        return jax.tree.map(jnp.add, acc, grads_of(train, frozen, mb, ref_params, mb_key)), None

      (grads, out), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum)))
    out = jax.tree.map(lambda x: x.astype(jnp.float32), out)
    denom = jnp.maximum(out.weight, 1e-9)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, train)
    updates, opt_state = optimizer.update(grads, state.opt_state, train)
    train = optax.apply_updates(train, updates)
    metrics = {**losses.reduce_output(out), 'grad_norm': optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=combine(train, frozen),
                         opt_state=opt_state), metrics

  return train_step


def make_eval_step(apply_fn: Callable, loss_fn: Callable, reference_fn: Callable | None = None):
  """Returns eval_step(params, batch, ref_params=None) -> LossOutput (sums, to add up over
  batches and reduce once with `losses.reduce_output`); the reference as in `make_train_step`."""

  def eval_step(params, batch, ref_params=None):
    if reference_fn is not None:
      ref_params = reference_fn(params)
    return _loss(loss_fn, params, batch, apply_fn, ref_params)

  return eval_step
