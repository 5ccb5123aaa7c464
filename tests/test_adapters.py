"""Adapters (`llmjax.models.adapters`): every configured target gets its leaves in every layer,
LoRA / rsLoRA / DoRA equal their formulas (DoRA's weight norm without gradient), fresh adapters
leave the model unchanged, merged weights equal the adapted model, dropout acts only in
training, a replacement kernel store composes with the adapters, and bad LoRA keys are
one-line ConfigErrors. PEFT parity of the same math: tests/test_peft.py."""

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from llmjax.errors import ConfigError
from llmjax.models import Transformer, adapters, lora
from llmjax.models.config import LORA_TARGETS, ModelConfig, get_preset
from llmjax.models.layers import DenseGeneral
from llmjax.models.transformer import init_params

CFG = dict(vocab_size=64, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
           mlp_dim=96, max_seq_len=64)
ALL = ('q', 'k', 'v', 'o', 'gate', 'up', 'down', 'head')
# Where each target's projection lives, written out here (not read from the model), so a
# projection whose call site stops passing its adapter fails below.
MODULE = {'q': ('attn', 'q'), 'k': ('attn', 'k'), 'v': ('attn', 'v'), 'o': ('attn', 'o'),
          'gate': ('mlp', 'gate'), 'up': ('mlp', 'up'), 'down': ('mlp', 'down'), 'head': ('head',)}
METHODS = {'lora': {}, 'rslora': dict(use_rslora=True, lora_ranks={'q': 8, 'down': 2}),
           'dora': dict(use_dora=True)}


def _cfg(**kw):
  return get_preset('tiny', **{**CFG, 'lora_rank': 4, 'lora_alpha': 6.0, **kw})


def _randomise(params, seed=1):
  """Nonzero B (init is zero) and magnitudes moved off their init, so adapters matter."""
  flat = traverse_util.flatten_dict(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  for k, (path, v) in zip(keys, sorted(flat.items())):
    if path[-1] == 'lora_b':
      flat[path] = 0.1 * jax.random.normal(k, v.shape, v.dtype)
    elif path[-1] == 'lora_magnitude':
      flat[path] = v * (1 + 0.2 * jax.random.normal(k, v.shape, v.dtype))
  return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize('scan_layers', [True, False])
@pytest.mark.parametrize('method', ['lora', 'dora'])
def test_every_target_gets_its_adapter_in_every_layer(scan_layers, method):
  assert set(ALL) == set(LORA_TARGETS)
  leaves = ('lora_a', 'lora_b') + (('lora_magnitude',) if method == 'dora' else ())
  for target in ALL:
    cfg = _cfg(lora_targets=(target,), scan_layers=scan_layers, **METHODS[method])
    flat = traverse_util.flatten_dict(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    found = {p for p in flat if lora.is_adapter(p)}
    if target == 'head':
      want = {MODULE['head'] + (leaf,) for leaf in leaves}
    elif scan_layers:
      want = {('layers',) + MODULE[target] + (leaf,) for leaf in leaves}
      assert all(flat[p].shape[0] == cfg.num_layers for p in want if p in flat)
    else:
      want = {(f'layer_{i}',) + MODULE[target] + (leaf,) for i in range(cfg.num_layers)
              for leaf in leaves}
    assert found == want, target
    assert lora.count(traverse_util.unflatten_dict(flat))[0] == cfg.num_lora_params


def _layer(cfg, target='o'):
  """The attention output projection: it contracts two dims (heads, head_dim)."""
  return DenseGeneral(features=64, axis=(-2, -1), kernel_axes=('heads', 'head_dim', 'embed'),
                      cfg=cfg, use_bias=True, adapter=adapters.for_target(cfg, target), name='o')


def _layer_params(cfg, seed=0):
  layer = _layer(cfg)
  x = jax.random.normal(jax.random.key(seed), (2, 5, 4, 16))
  params = nn.meta.unbox(layer.init(jax.random.key(1), x)['params'])
  return layer, x, params


@pytest.mark.parametrize('method', ['lora', 'rslora', 'dora'])
def test_adapted_projection_equals_the_formula(method):
  cfg = _cfg(lora_rank=3, lora_targets=('o',), **{**METHODS[method], 'lora_ranks': {}})
  layer, x, params = _layer_params(cfg)
  x2 = np.asarray(x, np.float64).reshape(10, 64)
  w = np.asarray(params['kernel'], np.float64).reshape(64, 64)
  if method == 'dora':  # init: the base's column norms
    np.testing.assert_allclose(params['lora_magnitude'], np.linalg.norm(w, axis=0), rtol=1e-6)
  params = _randomise(params)
  params['bias'] = jax.random.normal(jax.random.key(3), (64,))
  out = np.asarray(layer.apply({'params': params}, x), np.float64).reshape(10, 64)
  a = np.asarray(params['lora_a'], np.float64).reshape(64, 3)
  b = np.asarray(params['lora_b'], np.float64)
  bias = np.asarray(params['bias'], np.float64)
  s = 6.0 / math.sqrt(3) if method == 'rslora' else 6.0 / 3
  if method == 'dora':
    # DoRA (Liu et al. 2024, eq. 5): m * (W + s A B) / ||W + s A B||_c; the bias not rescaled.
    m = np.asarray(params['lora_magnitude'], np.float64)
    v = w + s * a @ b
    want = x2 @ (v * (m / np.linalg.norm(v, axis=0))) + bias
  else:
    want = x2 @ w + s * (x2 @ a) @ b + bias
  np.testing.assert_allclose(out, want, atol=3e-5, rtol=1e-5)


def test_dora_weight_norm_gets_no_gradient():
  # DoRA sec. 4.3 / PEFT: ||W + s A B||_c is a constant of the backward pass, so dL/dB is that
  # of g * s * x A B with g = m / norm fixed (not the function's true derivative).
  cfg = _cfg(lora_rank=3, lora_targets=('o',), use_dora=True)
  layer, x, params = _layer_params(cfg)
  params = _randomise(params)
  c = jax.random.normal(jax.random.key(4), (2, 5, 64))
  loss = lambda p: jnp.sum(layer.apply({'params': p}, x) * c)
  grad_b = np.asarray(jax.grad(loss)(params)['lora_b'], np.float64)
  x2 = np.asarray(x, np.float64).reshape(10, 64)
  w = np.asarray(params['kernel'], np.float64).reshape(64, 64)
  a = np.asarray(params['lora_a'], np.float64).reshape(64, 3)
  b = np.asarray(params['lora_b'], np.float64)
  m = np.asarray(params['lora_magnitude'], np.float64)
  g = m / np.linalg.norm(w + 2.0 * a @ b, axis=0)
  want = 2.0 * (x2 @ a).T @ (np.asarray(c, np.float64).reshape(10, 64) * g)
  np.testing.assert_allclose(grad_b, want, rtol=1e-4, atol=1e-4)


# Each method once, LoRA and DoRA both scanned and not (the merge's stacked-kernel path).
@pytest.mark.parametrize('method,scan_layers', [('lora', True), ('lora', False),
                                                ('rslora', False), ('dora', True),
                                                ('dora', False)])
def test_init_is_the_base_and_merge_is_the_adapted_model(method, scan_layers):
  cfg = _cfg(lora_targets=ALL, scan_layers=scan_layers, **METHODS[method])
  params = init_params(cfg, jax.random.key(0))
  assert lora.count(params) == (cfg.num_lora_params, cfg.num_params)
  _, base = lora.split(params)
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
  # Jitted, one compile a config, reused below: op by op, each forward spends seconds.
  forward = lambda c: jax.jit(lambda p: Transformer(c).apply({'params': p}, tokens)[0])
  adapted_forward = forward(cfg)
  want = forward(lora.without_lora(cfg))(base)
  got = adapted_forward(params)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # fresh adapters: the base model

  params = _randomise(params)
  adapted = adapted_forward(params)
  assert float(jnp.max(jnp.abs(adapted - want))) > 1e-2
  merged, merged_cfg = lora.merge(params, cfg)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  got = forward(merged_cfg)(merged)
  np.testing.assert_allclose(got, adapted, atol=2e-5, rtol=1e-5)
  # disable: the base again (DPO's reference), DoRA's magnitudes reset with B.
  off = adapted_forward(lora.disable(params))
  np.testing.assert_allclose(off, want, atol=1e-5, rtol=0)


def test_dora_over_a_new_base_starts_at_that_base():
  cfg = _cfg(use_dora=True, scan_layers=False)
  fresh = init_params(cfg, jax.random.key(0))
  _, other = lora.split(init_params(cfg, jax.random.key(7)))  # a "pretrained" base
  tokens = jnp.arange(10)[None] % cfg.vocab_size
  want, _ = Transformer(lora.without_lora(cfg)).apply({'params': other}, tokens)
  got, _ = Transformer(cfg).apply({'params': lora.with_base(fresh, other)}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  stale, _ = Transformer(cfg).apply({'params': lora.combine(lora.split(fresh)[0], other)}, tokens)
  assert float(jnp.max(jnp.abs(stale - want))) > 1e-3  # the init norms are the base's own


@pytest.mark.parametrize('method', ['lora', 'dora'])
def test_dropout_only_when_training(method):
  cfg = _cfg(lora_rank=3, lora_targets=('o',), lora_dropout=0.5, **METHODS[method])
  layer, x, params = _layer_params(cfg)
  params = _randomise(params)
  # A zero base kernel: the output is the adapter's term alone, so a wrong dropout scaling
  # shows at full size below.
  params['kernel'] = jnp.zeros_like(params['kernel'])
  no_drop = layer.apply({'params': params}, x)
  plain = _layer(dataclasses.replace(cfg, lora_dropout=0.0))
  np.testing.assert_array_equal(no_drop, plain.apply({'params': params}, x))  # eval: none
  with pytest.raises(Exception, match='dropout'):  # training needs the 'dropout' rng
    layer.apply({'params': params}, x, deterministic=False)
  train = lambda key: layer.apply({'params': params}, x, deterministic=False,
                                  rngs={'dropout': key})
  one = train(jax.random.key(0))
  assert float(jnp.max(jnp.abs(one - no_drop))) > 1e-3
  # Inverted dropout on the adapter's input (both methods are linear in it): the mean over
  # masks is the deterministic output.
  mean = jnp.mean(jax.vmap(train)(jax.random.split(jax.random.key(1), 4000)), axis=0)
  np.testing.assert_allclose(mean, no_drop, atol=0.15 * float(jnp.std(no_drop)))


def test_dropout_in_the_model_differs_per_layer_and_off_by_default():
  cfg = _cfg(lora_targets=('q',), lora_dropout=0.3, scan_layers=True)
  params = _randomise(init_params(cfg, jax.random.key(0)))
  tokens = jnp.arange(10)[None] % cfg.vocab_size
  eval_a, _ = Transformer(cfg).apply({'params': params}, tokens)
  eval_b, _ = Transformer(dataclasses.replace(cfg, lora_dropout=0.0)).apply({'params': params},
                                                                            tokens)
  np.testing.assert_array_equal(eval_a, eval_b)
  run = lambda c: Transformer(c).apply({'params': params}, tokens, deterministic=False,
                                       rngs={'dropout': jax.random.key(2)})[0]
  assert float(jnp.max(jnp.abs(run(cfg) - eval_a))) > 1e-3
  np.testing.assert_array_equal(run(cfg), run(cfg))  # a function of the key


def _int8_store(module, shape, init, kernel_axes):
  """A stand-in quantized base: int8 codes and a float32 scale per output column (the leaves
  a real store would own), dequantized on read."""
  def codes_init(rng, shape, dtype):
    return jnp.clip(jnp.round(init(rng, shape) / 0.02 * 127), -127, 127).astype(dtype)
  codes = module.param('kernel_int8', codes_init, shape, jnp.int8)
  scale = module.param('kernel_scale', lambda rng, s: jnp.full(s, 0.02 / 127, jnp.float32),
                       shape[-1:])
  return codes.astype(jnp.float32) * scale


@pytest.mark.parametrize('method', ['lora', 'dora'])
def test_a_replacement_kernel_store_composes_with_the_adapter(method):
  cfg = _cfg(lora_rank=3, lora_targets=('up',), **METHODS[method])
  quant = DenseGeneral(96, ('embed', 'mlp'), cfg, adapter=adapters.for_target(cfg, 'up'),
                       kernel_store=_int8_store)
  x = jax.random.normal(jax.random.key(0), (2, 5, 64))
  params = nn.meta.unbox(quant.init(jax.random.key(1), x)['params'])
  assert 'kernel' not in params and params['kernel_int8'].dtype == jnp.int8
  params = _randomise(params)
  # The same adapter over the dequantized kernel as a plain one: the same output.
  plain = DenseGeneral(96, ('embed', 'mlp'), cfg, adapter=adapters.for_target(cfg, 'up'))
  dense = {k: v for k, v in params.items() if not k.startswith('kernel')}
  dense['kernel'] = params['kernel_int8'].astype(jnp.float32) * params['kernel_scale']
  if method == 'dora':  # DoRA's norm is the dequantized kernel's
    np.testing.assert_allclose(
        nn.meta.unbox(quant.init(jax.random.key(1), x)['params'])['lora_magnitude'],
        np.linalg.norm(np.asarray(dense['kernel']), axis=0), rtol=1e-5)
  np.testing.assert_allclose(quant.apply({'params': params}, x),
                             plain.apply({'params': dense}, x), atol=1e-6, rtol=0)


def test_lora_key_errors_are_one_line():
  cases = [
      (dict(lora_rank=40),
       r"model.lora_rank=40 is larger than the 'k' projection \[64 -> 32\]; use a rank <= 32"),
      (dict(lora_rank=4, lora_ranks={'down': 97}),
       r"model.lora_ranks\['down'\]=97 is larger than the 'down' projection \[96 -> 64\]"),
      (dict(lora_rank=4, lora_ranks={'qq': 2}), "'qq' is not in model.lora_targets"),
      (dict(lora_rank=4, lora_targets=('q',), lora_ranks={'v': 2}),
       "'v' is not in model.lora_targets"),
      (dict(lora_rank=4, lora_ranks={'q': 0}), r"model.lora_ranks\['q'\]=0 must be a positive"),
      (dict(lora_rank=4, lora_dropout=1.0), r'model.lora_dropout=1.0 must be in \[0, 1\)'),
      (dict(use_dora=True), 'model.use_dora is set but model.lora_rank=0'),
      (dict(lora_ranks={'q': 2}), 'model.lora_ranks is set but model.lora_rank=0'),
  ]
  for overrides, match in cases:
    with pytest.raises(ConfigError, match=match) as e:
      get_preset('tiny', **{**CFG, **overrides})
    assert '\n' not in str(e.value)


def test_lora_ranks_round_trip_through_json_and_config_dicts():
  import ml_collections
  cfg = _cfg(lora_ranks={'q': 8, 'down': 2}, use_dora=True)
  assert hash(cfg) == hash(_cfg(lora_ranks={'down': 2, 'q': 8}, use_dora=True))
  back = ModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
  assert back == cfg and adapters.rank_of(back, 'q') == 8 and adapters.rank_of(back, 'k') == 4
  c = ml_collections.ConfigDict(dataclasses.asdict(_cfg()))
  c.lora_ranks = {'v': 2}  # as an experiment file or --config.model.lora_ranks sets it
  assert ModelConfig.from_dict(c).lora_ranks == {'v': 2}
  with pytest.raises(ConfigError, match='must be a mapping'):
    ModelConfig.from_dict({**dataclasses.asdict(_cfg()), 'lora_ranks': [8]})


def test_train_step_applies_lora_dropout_and_eval_does_not():
  from test_train import batch_of, small_config, trainer_for

  def losses_of(dropout):
    c = small_config(steps=10, lr=0.0)
    c.model.lora_rank, c.model.lora_dropout = 4, dropout
    _, tr = trainer_for(c)
    state = tr.init(jax.random.key(0))
    state = state.replace(params=_randomise(state.params))  # B != 0: the adapters matter
    batch = batch_of(np.asarray(jax.random.randint(jax.random.key(5), (4, 17), 0, 32)))
    out = []
    for _ in range(2):
      state, m = tr.train_step(state, batch)
      out.append(float(m['loss']))
    ev = tr.eval_step(state.params, batch)
    return out, float(ev.total / ev.weight)

  (a, b), eval_loss = losses_of(0.0)
  assert a == pytest.approx(b, abs=1e-6) and a == pytest.approx(eval_loss, abs=1e-5)
  (c, d), eval_dropped = losses_of(0.5)
  assert eval_dropped == pytest.approx(eval_loss, abs=1e-5)  # no dropout in evaluation
  assert abs(c - eval_loss) > 1e-4 and abs(c - d) > 1e-5  # a new mask each step
