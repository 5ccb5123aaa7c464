"""LoRA: the adapted projection equals its formula, fresh adapters change nothing, merging
equals the adapted model, training moves only the adapters (with the gradients of the full
model), and fine-tuning from a Hugging Face checkpoint exports a merged checkpoint."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from llmjax import config as config_lib
from llmjax.errors import CheckpointError, ConfigError
from llmjax.models import Transformer, adapters, lora
from llmjax.models.config import ModelConfig, get_preset
from llmjax.models.layers import DenseGeneral
from llmjax.models.transformer import init_params
from llmjax.train import checkpoint, losses
from llmjax.train.loop import train_and_evaluate

from test_train import batch_of, small_config, trainer_for

CFG = dict(vocab_size=64, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
           mlp_dim=96, max_seq_len=64)


def _randomise_adapters(params, seed=1):
  """Nonzero B (init is zero) so the adapters change the output."""
  flat = traverse_util.flatten_dict(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  for k, (path, v) in zip(keys, sorted(flat.items())):
    if path[-1] == 'lora_b':
      flat[path] = 0.1 * jax.random.normal(k, v.shape, v.dtype)
  return traverse_util.unflatten_dict(flat)


def test_adapted_projection_equals_the_formula():
  # The attention output projection contracts two dims (heads, head_dim): the adapter must too.
  cfg = get_preset('tiny', **CFG, lora_rank=3, lora_alpha=6.0, lora_targets=('o',))
  layer = DenseGeneral(features=64, axis=(-2, -1), kernel_axes=('heads', 'head_dim', 'embed'),
                       cfg=cfg, adapter=adapters.for_target(cfg, 'o'), name='o')
  x = jax.random.normal(jax.random.key(0), (2, 5, 4, 16))
  params = jax.tree.map(lambda p: p, layer.init(jax.random.key(1), x)['params'])
  params = {k: getattr(v, 'value', v) for k, v in params.items()}
  assert params['lora_a'].shape == (4, 16, 3) and params['lora_b'].shape == (3, 64)
  assert not np.any(params['lora_b'])  # B starts at zero
  params['lora_b'] = jax.random.normal(jax.random.key(2), (3, 64))
  out = layer.apply({'params': params}, x)
  x2 = np.asarray(x, np.float64).reshape(10, 64)
  w = np.asarray(params['kernel'], np.float64).reshape(64, 64)
  a = np.asarray(params['lora_a'], np.float64).reshape(64, 3)
  b = np.asarray(params['lora_b'], np.float64)
  want = x2 @ w + (6.0 / 3) * (x2 @ a) @ b
  np.testing.assert_allclose(np.asarray(out).reshape(10, 64), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_fresh_adapters_leave_the_model_unchanged_and_merge_is_exact(scan_layers):
  cfg = get_preset('tiny', **CFG, lora_rank=4, scan_layers=scan_layers,
                   lora_targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down', 'head'))
  params = init_params(cfg, jax.random.key(0))
  adapters, base = lora.split(params)
  assert lora.count(params) == (cfg.num_lora_params, cfg.num_params)
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
  base_cfg = lora.without_lora(cfg)
  want, _ = Transformer(base_cfg).apply({'params': base}, tokens)
  got, _ = Transformer(cfg).apply({'params': params}, tokens)
  np.testing.assert_array_equal(got, want)  # B = 0: adding x @ A @ 0 is exact

  params = _randomise_adapters(params)
  adapted, _ = Transformer(cfg).apply({'params': params}, tokens)
  assert float(jnp.max(jnp.abs(adapted - want))) > 1e-2  # the adapters do something
  merged, merged_cfg = lora.merge(params, cfg)
  assert merged_cfg == base_cfg
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  got, _ = Transformer(merged_cfg).apply({'params': merged}, tokens)
  np.testing.assert_allclose(got, adapted, atol=2e-5, rtol=1e-5)


def _lora_small_config(**train):
  c = small_config(**train)
  c.model.lora_rank = 4
  c.model.lora_alpha = 8.0
  return c


def test_training_moves_only_the_adapters_and_memorises():
  c = _lora_small_config(steps=150, lr=1e-2)
  # With the LM head frozen too, a random 64-wide model plateaus near the sequence's unigram
  # entropy; an adapter on the head lets it memorise.
  c.model.lora_targets = ['q', 'k', 'v', 'o', 'gate', 'up', 'down', 'head']
  c.model.lora_rank = 8
  c.model.lora_alpha = 16.0
  cfg, tr = trainer_for(c)
  seq = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3] * 2)
  batch = batch_of(np.stack([seq] * 4))
  state = tr.init(jax.random.key(0))
  # Adam moments exist only for the adapters: 2 moments x the adapter parameters.
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim >= 1)
  assert moments == 2 * cfg.num_lora_params
  before = jax.tree.map(np.asarray, state.params)
  first = None
  for _ in range(150):
    state, m = tr.train_step(state, batch)
    first = float(m['loss']) if first is None else first
  after_adapters, after_base = lora.split(jax.tree.map(np.asarray, state.params))
  before_adapters, before_base = lora.split(before)
  jax.tree.map(np.testing.assert_array_equal, after_base, before_base)  # bit-identical
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), after_adapters, before_adapters)
  assert all(jax.tree.leaves(changed))
  assert float(m['loss']) < 0.05, (first, float(m['loss']))


def test_adapter_gradients_are_the_full_models_gradients():
  c = _lora_small_config(steps=10, lr=0.0, grad_clip=1e9)
  cfg, tr = trainer_for(c)
  state = tr.init(jax.random.key(0))
  state = state.replace(params=_randomise_adapters(state.params))  # so A has a gradient too
  rows = np.asarray(jax.random.randint(jax.random.key(5), (4, 17), 0, 32))
  batch = batch_of(rows)
  model = Transformer(cfg)
  apply_fn = lambda p, tokens, **kw: model.apply({'params': p}, tokens, **kw)
  def mean_loss(p):
    out = losses.next_token_loss(p, batch, apply_fn)
    return out.total / out.weight
  grads = jax.jit(jax.grad(mean_loss))(state.params)
  want, _ = lora.split(grads)
  _, m = tr.train_step(state, batch)
  want_norm = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(want))))
  np.testing.assert_allclose(float(m['grad_norm']), want_norm, rtol=1e-5)


def test_config_errors_name_the_key():
  with pytest.raises(ConfigError, match=r"model.lora_targets: 'qq' .* Did you mean 'q'"):
    get_preset('tiny', lora_rank=4, lora_targets=('qq',))
  with pytest.raises(ConfigError, match='model.lora_rank=-1'):
    get_preset('tiny', lora_rank=-1)
  # A tied model's head is the embedding: a 'head' adapter would not exist and train nothing.
  with pytest.raises(ConfigError, match=r"model.lora_targets names 'head' but"
                                        r" model.tie_embeddings=True.*drop 'head'"):
    get_preset('llama3-1b', lora_rank=4, lora_targets=('q', 'head'))
  get_preset('llama3-8b', lora_rank=4, lora_targets=('q', 'head'))  # untied: fine
  d = dataclasses.asdict(get_preset('tiny', lora_rank=2))
  d['lora_targets'] = list(d['lora_targets'])  # as a ConfigDict or JSON holds it
  assert ModelConfig.from_dict(d).lora_targets == ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden', 'llama_gqa_llama3')


def test_lora_from_hf_checkpoint_trains_adapters_and_exports_merged(tmp_path):
  from llmjax import convert
  from llmjax.interop import load_hf
  from test_init_hf import hf_config
  c = hf_config(GOLDEN, steps=3, lr=5e-2, eval_every=3)
  c.model.lora_rank = 4
  c.model.lora_targets = ['q', 'v', 'down']
  workdir = str(tmp_path / 'run')
  train_and_evaluate(c, workdir)
  cfg = checkpoint.read_model_config(workdir)
  assert cfg.lora_rank == 4 and cfg.lora_targets == ('q', 'v', 'down')
  params, _ = checkpoint.restore_params(workdir)
  adapters, base = lora.split(params)
  _, hf_params, _ = load_hf(GOLDEN)
  jax.tree.map(np.testing.assert_array_equal, base, hf_params)  # the base stayed frozen
  assert any(np.any(np.asarray(b)) for p, b in traverse_util.flatten_dict(adapters).items()
             if p[-1] == 'lora_b')  # and the adapters trained

  # Resuming with another rank is refused before anything compiles.
  c.model.lora_rank = 8
  with pytest.raises(CheckpointError, match='model.lora_rank=8 but the saved model_config.json has 4'):
    train_and_evaluate(c, workdir)

  # Export folds the adapters in: transformers-layout weights of the adapted model.
  out = str(tmp_path / 'hf')
  assert convert.main([f'--src={workdir}', f'--dst={out}', '--to=hf']) == 0
  exported_cfg, exported, exported_tokenizer = load_hf(out)
  # The run's tokenizer (the checkpoint's, kept in WORKDIR/hf_tokenizer) travels with it.
  assert exported_tokenizer is not None
  assert os.path.exists(os.path.join(out, 'tokenizer.json'))
  merged, merged_cfg = lora.merge(params, cfg)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), exported, merged)
  tokens = jnp.arange(10)[None] % exported_cfg.vocab_size
  want, _ = Transformer(cfg).apply({'params': params}, tokens)
  got, _ = Transformer(exported_cfg).apply({'params': exported}, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
