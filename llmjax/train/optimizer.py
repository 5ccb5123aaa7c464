"""AdamW with linear warmup and cosine decay, global-norm clipping (Loshchilov & Hutter 2019)."""

import jax
import optax


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio`."""
  steps = max(int(train_cfg.steps), 2)
  warmup = min(max(int(train_cfg.warmup_steps), 1), steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.lr, warmup_steps=warmup, decay_steps=steps,
      end_value=train_cfg.lr * train_cfg.min_lr_ratio)


def _decay_mask(params):
  # Weight decay only on matrices: decaying norm scales and biases towards 0 hurts
  # (as in GPT-2/nanoGPT and most LLM recipes).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule). Gradients arrive already averaged over accumulation."""
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                  eps=1e-8, weight_decay=train_cfg.weight_decay, mask=_decay_mask),
  )
