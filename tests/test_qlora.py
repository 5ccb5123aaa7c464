"""QLoRA (model.base_quant): the frozen base stored quantized, adapters float32.

References: `llmjax.quant` (the ported bitsandbytes NF4 / int8, itself tested against
bitsandbytes goldens) for the stored values; the float-base LoRA model for the numerics.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from llmjax import quant
from llmjax.errors import ConfigError
from llmjax.models import Transformer, layers, lora
from llmjax.models.config import ModelConfig
from llmjax.models.transformer import init_params
from llmjax.train import checkpoint
from llmjax.train import state as state_lib

from test_train import batch_of, small_config, trainer_for

TINY = dict(vocab_size=32, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
            num_layers=2, max_seq_len=32, lora_rank=4, lora_alpha=8.0)


def _cfg(**kw):
  return ModelConfig(**{**TINY, **kw})


@functools.cache
def _forward(cfg):
  return jax.jit(lambda params, tokens: Transformer(cfg).apply({'params': params}, tokens)[0])


def _logits(cfg, params, tokens):
  # Jitted, one compile a config (op by op, the dequantization alone dispatches hundreds of ops).
  return np.asarray(_forward(cfg)(params, tokens))


@pytest.mark.parametrize('double', [False, True])
@pytest.mark.parametrize('shape', [(64, 96), (3, 5, 7), (128, 4, 64)])
def test_nf4_store_values_equal_quant_dequantize_nf4(shape, double):
  # The store packs its own way but must hold exactly bitsandbytes' codes and absmax.
  cfg = _cfg(base_quant='nf4', quant_double=double, quant_block_size=16)
  w = jax.random.normal(jax.random.key(1), shape) * 3
  leaves = layers.quantize_kernel(cfg, w, 1)
  got = layers.dequantize_kernel(cfg, leaves, shape, jnp.float32)
  want = quant.dequantize_nf4(quant.quantize_nf4(w, 16, double), jnp.float32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_int8_store_values_equal_quant_dequantize_int8():
  cfg = _cfg(base_quant='int8')
  w = jax.random.normal(jax.random.key(2), (4, 16, 64))
  leaves = layers.quantize_kernel(cfg, w, 2)
  got = layers.dequantize_kernel(cfg, leaves, w.shape, jnp.float32)
  want = quant.dequantize_int8(quant.quantize_int8(w, axis=-1), jnp.float32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# Logits of the tiny model are O(0.5); NF4 (16 levels a 64-block) moves them by ~0.05, int8
# (255 levels a channel) by ~0.003. The bounds leave 2-3x room.
TOLERANCE = {'nf4': 0.15, 'int8': 0.01}


# Each format once, scanned and unrolled layers between them (the stores are per layer).
@pytest.mark.parametrize('q,scan_layers', [('nf4', True), ('int8', False)])
def test_qlora_at_init_is_the_dequantized_base_and_close_to_the_float_model(q, scan_layers):
  cfg = _cfg(base_quant=q, scan_layers=scan_layers)
  float_cfg = lora.float_base(cfg)
  float_params = init_params(float_cfg, jax.random.key(0))
  params = lora.quantize_base(float_params, cfg)
  tokens = jnp.arange(16).reshape(2, 8) % 32
  got = _logits(cfg, params, tokens)
  # B = 0: the QLoRA model is exactly the base with dequantized kernels...
  np.testing.assert_array_equal(got, _logits(float_cfg, lora.dequantize_base(params, cfg), tokens))
  # ... which is close to the float model.
  want = _logits(float_cfg, float_params, tokens)
  assert 0 < np.max(np.abs(got - want)) < TOLERANCE[q] * np.max(np.abs(want))
  # merge (export, generate) folds the adapters into the dequantized kernels: same model.
  adapters, base = lora.split(params)
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                          adapters)
  trained = lora.combine(adapters, base)
  merged, merged_cfg = lora.merge(trained, cfg)
  assert merged_cfg.base_quant == '' and not merged_cfg.lora_rank
  np.testing.assert_allclose(_logits(merged_cfg, merged, tokens), _logits(cfg, trained, tokens),
                             atol=1e-5)


def test_init_layout_has_quantized_leaves_only_for_block_projections():
  params = jax.eval_shape(lambda: init_params(_cfg(base_quant='nf4'), jax.random.key(0)))
  flat = traverse_util.flatten_dict(params)
  kernels = {p[:-1] for p in flat if p[-1] == 'kernel'}
  packed = {p[:-1] for p in flat if p[-1] == 'kernel_nf4'}
  assert kernels == {('head',)}  # the LM head stays float, as in QLoRA
  assert len(packed) == 7 and all(flat[p + ('kernel_nf4',)].dtype == jnp.uint8 for p in packed)
  assert flat[('embed', 'embedding')].dtype == jnp.float32


@pytest.mark.parametrize('double', [False, True])
def test_quantized_param_bytes_are_nf4_bytes_per_param(double):
  bs = 16  # every tiny kernel's rows split into whole blocks: the formula is exact
  cfg = _cfg(base_quant='nf4', quant_block_size=bs, quant_double=double)
  flat = traverse_util.flatten_dict(
      jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
  quantized = sum(a.size * a.dtype.itemsize for p, a in flat.items()
                  if p[-1] in layers.QUANT_LEAVES)
  n = sum(int(np.prod(s)) for p, (s, _) in lora.kernel_specs(cfg).items() if p != ('head', 'kernel'))
  expected = quant.nf4_bytes_per_param(bs, double) * n
  # Double quantization adds per-kernel rounding of the 256-blocks and a 4-byte offset.
  assert abs(quantized - expected) <= (0 if not double else 14 * (4 + 4))


def _qlora_config(q='nf4', **train):
  c = small_config(**train)
  c.model.lora_rank, c.model.lora_alpha = 4, 8.0
  c.model.base_quant = q
  return c


def test_train_step_matches_float_lora_and_moves_only_the_adapters(tmp_path):
  seq = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3] * 2)
  batch = batch_of(np.stack([seq] * 4))
  cfg, tr = trainer_for(_qlora_config(lr=1e-2))
  float_cfg, float_tr = trainer_for(_qlora_config('', lr=1e-2))
  state = tr.init(jax.random.key(0))
  # The same adapters over the float base that these NF4 kernels quantize.
  # (copies: init_from donates what it is given)
  float_state = float_tr.init_from(
      lora.dequantize_base(jax.tree.map(jnp.array, state.params), cfg), jax.random.key(0))
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim >= 1)
  assert moments == 2 * cfg.num_lora_params  # no Adam state for the packed leaves
  before = jax.tree.map(np.asarray, state.params)
  losses, float_losses = [], []
  for _ in range(5):
    state, m = tr.train_step(state, batch)
    float_state, fm = float_tr.train_step(float_state, batch)
    losses.append(float(m['loss']))
    float_losses.append(float(fm['loss']))
  # Over the same (dequantized) base the two runs are one model: float32 rounding only.
  np.testing.assert_allclose(losses, float_losses, rtol=1e-4)
  after_adapters, after_base = lora.split(jax.tree.map(np.asarray, state.params))
  before_adapters, before_base = lora.split(before)
  jax.tree.map(np.testing.assert_array_equal, after_base, before_base)  # packed bytes unchanged
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                          after_adapters, before_adapters)))
  # A checkpoint holds the packed leaves; restoring gives them back bit for bit.
  workdir = str(tmp_path / 'run')
  checkpoint.write_model_config(workdir, cfg)
  manager = checkpoint.make_manager(workdir, max_to_keep=1, async_save=False)
  checkpoint.save(manager, 5, state, force=True)
  manager.wait_until_finished()
  restored = checkpoint.restore(manager, tr.abstract_state)
  manager.close()
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored.params),
               jax.tree.map(np.asarray, state.params))
  packed = [a for p, a in traverse_util.flatten_dict(restored.params).items()
            if p[-1] == 'kernel_nf4']
  assert len(packed) == 7 * cfg.num_layers // (cfg.num_layers if cfg.scan_layers else 1)
  assert all(a.dtype == jnp.uint8 for a in packed)
  state2, m2 = tr.train_step(restored, batch)
  assert np.isfinite(float(m2['loss']))
  # generate/convert read the workdir's params through lora.merge: a float model.
  params, _ = checkpoint.restore_params(workdir)
  merged, merged_cfg = lora.merge(params, checkpoint.read_model_config(workdir))
  flat = traverse_util.flatten_dict(merged)
  assert merged_cfg.base_quant == '' and not any(p[-1] in layers.QUANT_LEAVES for p in flat)
  assert sum(p[-1] == 'kernel' for p in flat) == len(packed) + 1  # + the LM head


def test_a_float_source_is_quantized_leaf_by_leaf_when_the_state_is_built(tmp_path):
  cfg, tr = trainer_for(_qlora_config())
  float_cfg = lora.without_lora(cfg)
  float_params = init_params(float_cfg, jax.random.key(5))
  src = str(tmp_path / 'src')
  checkpoint.write_params_workdir(src, float_cfg, float_params)
  given = state_lib.source_params(tr.abstract_state.params, cfg, params_dir=src)
  state = tr.init_from(given, jax.random.key(0))
  want = lora.quantize_base(float_params, cfg)
  _, base = lora.split(jax.tree.map(np.asarray, state.params))
  jax.tree.map(np.testing.assert_array_equal, base,
               jax.tree.map(np.asarray, lora.split(want)[1]))
  # and the built state computes the quantized float model (B = 0)
  tokens = jnp.arange(16).reshape(2, 8) % 32
  np.testing.assert_array_equal(
      _logits(cfg, state.params, tokens),
      _logits(float_cfg, lora.dequantize_base(lora.split(jax.tree.map(jnp.asarray, state.params))[1], cfg), tokens))


def test_training_a_quantized_base_without_adapters_is_a_one_line_error():
  # Without adapters a quantized model is for inference (llmjax.quantize); ModelConfig takes
  # it, training refuses it before anything is built.
  from llmjax import config as config_lib
  ModelConfig.from_dict({**TINY, 'base_quant': 'nf4', 'lora_rank': 0})
  with pytest.raises(ConfigError, match='set model.lora_rank') as e:
    config_lib.validate(_no_lora_quant_config(), data_files=False)
  assert '\n' not in str(e.value)


def _no_lora_quant_config():
  c = _qlora_config()
  c.model.lora_rank = 0
  return c


@pytest.mark.parametrize('kw, key', [
    (dict(use_dora=True), 'DoRA'),
    (dict(base_quant='nf8'), 'model.base_quant'),
    (dict(quant_block_size=63), 'model.quant_block_size'),
])
def test_bad_configs_are_one_line_errors(kw, key):
  with pytest.raises(ConfigError, match=key) as e:
    ModelConfig.from_dict({**TINY, 'base_quant': 'nf4', **kw})
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('quant_kind,rtol', [('nf4', 2e-3), ('int8', 5e-4)])
def test_qlora_losses_are_close_to_float32_base_lora(quant_kind, rtol):
  """QLoRA against LoRA over the float32 kernels it quantizes: the base's quantization error
  is all that separates them. Over five steps the losses differ by at most 3.7e-4 relative
  with NF4 and 5.6e-5 with int8 (measured); the bounds leave a 5x margin."""
  seq = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3] * 2)
  batch = batch_of(np.stack([seq] * 4))
  float_cfg, float_tr = trainer_for(_qlora_config('', lr=1e-2))
  cfg, tr = trainer_for(_qlora_config(quant_kind, lr=1e-2))
  float_state = float_tr.init(jax.random.key(0))
  state = tr.init_from(lora.quantize_base(jax.tree.map(jnp.array, float_state.params), cfg),
                       jax.random.key(0))
  losses, float_losses = [], []
  for _ in range(5):
    state, m = tr.train_step(state, batch)
    float_state, fm = float_tr.train_step(float_state, batch)
    losses.append(float(m['loss']))
    float_losses.append(float(fm['loss']))
  err = np.max(np.abs(np.array(losses) / np.array(float_losses) - 1))
  assert 0 < err < rtol, (quant_kind, err, losses, float_losses)
