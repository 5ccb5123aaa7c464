"""AdamW with linear warmup and cosine decay, global-norm clipping (Loshchilov & Hutter 2019)."""

import optax
from flax import traverse_util


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio`.

  warmup_steps=0: no warmup, the first step runs at `lr` (a warmup of one step would spend
  the first update at rate 0).
  """
  steps = max(int(train_cfg.steps), 2)
  if int(train_cfg.warmup_steps) <= 0:
    return optax.cosine_decay_schedule(train_cfg.lr, decay_steps=steps,
                                       alpha=train_cfg.min_lr_ratio)
  warmup = min(int(train_cfg.warmup_steps), steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.lr, warmup_steps=warmup, decay_steps=steps,
      end_value=train_cfg.lr * train_cfg.min_lr_ratio)


# Leaf names that weight decay applies to: projection kernels (LoRA adapters included) and the
# token/position embeddings. Norm scales and biases are never decayed: pulling a norm's scale
# towards 0 (or a bias towards 0) fights what the layer needs (GPT-2/nanoGPT and most LLM
# recipes). Decided by name, not rank: scanned layers stack every leaf with a [layers] dim, so
# a norm scale is [L, d] there, and q/k/v biases are [heads, head_dim] even unscanned.
DECAYED_LEAVES = ('kernel', 'embedding', 'pos_embedding', 'lora_a', 'lora_b')


def decay_mask(params):
  """A bool pytree like `params` (any nested dict of arrays or structs): True where decayed."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: p[-1] in DECAYED_LEAVES for p in flat})


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule). Gradients arrive already averaged over accumulation."""
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                  eps=1e-8, weight_decay=train_cfg.weight_decay, mask=decay_mask),
  )
