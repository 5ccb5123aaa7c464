"""AdamW's weight-decay mask: decided by what a parameter is, not by its rank."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from llmjax.models.config import get_preset
from llmjax.models.transformer import init_params
from llmjax.train.optimizer import make_optimizer


def _train_cfg(**kw):
  c = ml_collections.ConfigDict(dict(steps=10, warmup_steps=1, lr=1e-2, min_lr_ratio=0.1,
                                     weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0))
  c.update(kw)
  return c


# Scanned (every leaf gets a leading [layers] dim, so norm scales are [L, d]) and GPT-2's
# shapes (LayerNorm biases, q/k/v biases [heads, head_dim], learned positions, tied head).
MODELS = {
    'tiny_scanned': get_preset('tiny', num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
                               head_dim=16, mlp_dim=128, vocab_size=64, scan_layers=True),
    'gpt2': get_preset('gpt2', num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4,
                       head_dim=16, mlp_dim=256,
                       vocab_size=64, max_seq_len=32),
    'gpt2_unscanned': get_preset('gpt2', num_layers=2, embed_dim=64, num_heads=4,
                                 num_kv_heads=4, head_dim=16,
                                 mlp_dim=256, vocab_size=64, max_seq_len=32, scan_layers=False),
    'qwen_lora': get_preset('qwen2.5-0.5b', num_layers=2, embed_dim=64, num_heads=4,
                            num_kv_heads=2, head_dim=16, mlp_dim=128, vocab_size=64,
                            lora_rank=4),
}


@pytest.mark.parametrize('name', MODELS)
def test_zero_gradient_step_decays_every_kernel_and_no_norm_or_bias(name):
  cfg = MODELS[name]
  # Jitted, one compile: op by op, the init and each per-leaf op compile every primitive.
  params = jax.jit(lambda key: jax.tree.map(  # no zeros: decay must show on every leaf
      lambda p: p + 0.5, init_params(cfg, key)))(jax.random.key(0))
  opt = make_optimizer(_train_cfg())
  state = jax.jit(opt.init)(params)
  grads = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p))(params)
  update = jax.jit(opt.update)
  for _ in range(2):  # step 0 has lr 0 (warmup starts at 0); step 1 has lr > 0
    updates, state = update(grads, state, params)
  flat = traverse_util.flatten_dict(updates)
  kinds = {}
  for path, u in flat.items():
    changed = bool(np.any(np.asarray(u) != 0))
    leaf = path[-1]
    kinds.setdefault(leaf, set()).add(changed)
    if leaf in ('kernel', 'embedding', 'pos_embedding', 'lora_a', 'lora_b'):
      assert changed and np.all(np.asarray(u) != 0), f"{path} was not decayed"
    else:
      assert leaf in ('scale', 'bias'), path
      assert not changed, f"{path} was decayed"
  assert 'scale' in kinds and 'kernel' in kinds
  if name.startswith('gpt2') or name == 'qwen_lora':
    assert 'bias' in kinds
