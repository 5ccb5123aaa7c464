"""The learning-rate schedule against values computed by hand: linear warmup 0 -> lr over
train.warmup_steps, then cosine to lr * min_lr_ratio at train.steps; and the optimizer
applying it step by step."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from llmjax.train.optimizer import learning_rate_schedule, make_optimizer

LR, WARMUP, STEPS, RATIO = 1e-3, 10, 110, 0.1  # 100 decay steps after the warmup


def _train_cfg(**kw):
  c = ml_collections.ConfigDict(dict(lr=LR, warmup_steps=WARMUP, steps=STEPS, min_lr_ratio=RATIO,
                                     grad_clip=1e9, b1=0.9, b2=0.95, weight_decay=0.0))
  c.update(kw)
  return c


@pytest.mark.parametrize('step, want', [
    (0, 0.0),                  # warmup starts at 0
    (5, 0.5e-3),               # mid-warmup: 5/10 of lr
    (10, 1e-3),                # end of warmup: the peak
    (35, 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4))),  # a quarter of the decay
    (60, 1e-4 + 0.9e-3 * 0.5),  # mid-decay: halfway between peak and floor
    (110, 1e-4),               # the last step: lr * min_lr_ratio
    (500, 1e-4),               # past the end it stays at the floor
])
def test_schedule_against_hand_computed_values(step, want):
  assert float(learning_rate_schedule(_train_cfg())(step)) == pytest.approx(want, rel=1e-6,
                                                                             abs=1e-12)


def test_schedule_is_monotone_up_then_down():
  lrs = np.array([float(learning_rate_schedule(_train_cfg())(s)) for s in range(STEPS + 1)])
  assert (np.diff(lrs[:WARMUP + 1]) > 0).all() and (np.diff(lrs[WARMUP:]) < 0).all()
  assert lrs.argmax() == WARMUP


def test_optimizer_steps_by_the_schedule():
  """Adam with a constant gradient normalises it to (almost) 1, so update k is -lr(k): the
  optimizer's k-th update (counting from 0) uses the schedule at step k."""
  opt = make_optimizer(_train_cfg())
  params = {'w': jnp.zeros((3,))}
  state = opt.init(params)
  grads = {'w': jnp.ones((3,))}
  for k in range(WARMUP + 3):
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    want = float(learning_rate_schedule(_train_cfg())(k))
    np.testing.assert_allclose(np.asarray(updates['w']), -want, rtol=1e-5, atol=1e-10)


def test_no_warmup_starts_at_the_peak():
  c = ml_collections.ConfigDict(dict(lr=LR, warmup_steps=0, steps=STEPS, min_lr_ratio=RATIO))
  s = learning_rate_schedule(c)
  assert float(s(0)) == pytest.approx(LR)
  # Half way: lr * (ratio + (1 - ratio) * (1 + cos(pi / 2)) / 2), by hand.
  assert float(s(STEPS // 2)) == pytest.approx(LR * (RATIO + (1 - RATIO) * 0.5), rel=1e-5)
  assert float(s(STEPS)) == pytest.approx(LR * RATIO)
