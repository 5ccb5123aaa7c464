"""Model tests: published shapes, masking properties, RoPE, KV-cache decoding, attention."""

import ast
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.errors import ConfigError
from llmjax.models import PRESETS, Cache, Mask, Transformer, get_preset, init_params
from llmjax.models import layers, transformer
from llmjax.models.attention import reference_attention, xla_attention
from llmjax.models.config import ModelConfig
from llmjax.models.rope import apply_rope, inv_frequencies

# Parameter counts as published by the model authors (model cards / HF `num_parameters()`).
PUBLISHED = {
    'gpt2': 124_439_808, 'gpt2-medium': 354_823_168, 'gpt2-large': 774_030_080,
    'gpt2-xl': 1_557_611_200, 'llama3-1b': 1_235_814_400, 'llama3-3b': 3_212_749_824,
    'llama3-8b': 8_030_261_248, 'qwen2.5-0.5b': 494_032_768, 'qwen2.5-1.5b': 1_543_714_304,
    'qwen2.5-7b': 7_615_616_512, 'mistral-7b': 7_241_732_096,
}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_preset_parameter_count_is_published(name):
  cfg = PRESETS[name]
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == PUBLISHED[name]
  assert cfg.num_params == PUBLISHED[name]


def test_qwen25_7b_shapes_are_its_config_json():
  c = PRESETS['qwen2.5-7b']
  assert (c.embed_dim, c.num_layers, c.num_heads, c.num_kv_heads, c.mlp_dim, c.vocab_size) == (
      3584, 28, 28, 4, 18944, 152064)
  assert c.rope_theta == 1e6 and c.qkv_bias and not c.tie_embeddings


def test_unknown_preset_and_bad_heads_are_one_line_errors():
  with pytest.raises(ConfigError, match="Did you mean 'llama3-8b'"):
    get_preset('llama3-8')
  with pytest.raises(ConfigError, match='num_kv_heads=3 must divide model.num_heads=4'):
    get_preset('tiny', num_kv_heads=3)


def tiny(**kw):
  base = dict(vocab_size=97, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
              head_dim=16, mlp_dim=96, max_seq_len=128, scan_layers=True)
  base.update(kw)
  return get_preset('tiny', **base)


FAMILIES = {
    'llama_gqa': tiny(),
    'mqa_window': tiny(num_kv_heads=1, sliding_window=5),
    'qwen_bias_tied': tiny(qkv_bias=True, tie_embeddings=True),
    'gpt2': tiny(norm='layernorm', mlp='gelu', position='learned', qkv_bias=True,
                 out_bias=True, mlp_bias=True, tie_embeddings=True, num_kv_heads=4),
    'unscanned_remat': tiny(scan_layers=False, remat='full'),
    'scanned_remat_qkv': tiny(remat='qkv_proj'),
}


@functools.cache
def _apply(cfg):
  # Jitted: op-by-op, a decode loop of the tiny model spends seconds dispatching each op.
  return jax.jit(lambda params, tokens, **kw: Transformer(cfg).apply({'params': params}, tokens,
                                                                     **kw))


def _logits(cfg, params, tokens, **kw):
  return _apply(cfg)(params, tokens, **kw)[0]


# Causality does not depend on biases, tying or remat (remat changes the backward only:
# test_remat_policies_give_the_same_gradients), so 'qwen_bias_tied' (its biases and tying are
# in 'gpt2') and 'scanned_remat_qkv' (forward = 'llama_gqa') add nothing here.
@pytest.mark.parametrize('name', ['gpt2', 'llama_gqa', 'mqa_window', 'unscanned_remat'])
def test_future_tokens_do_not_change_outputs(name):
  cfg = FAMILIES[name]
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
  changed = tokens.at[:, 15:].set((tokens[:, 15:] + 1) % cfg.vocab_size)
  a, b = _logits(cfg, params, tokens), _logits(cfg, params, changed)
  np.testing.assert_array_equal(a[:, :15], b[:, :15])
  assert not np.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize('name', ['llama_gqa', 'gpt2'])
def test_packed_documents_do_not_see_each_other(name):
  cfg = FAMILIES[name]
  params = init_params(cfg, jax.random.key(0))
  seg = jnp.array([[1] * 10 + [2] * 8 + [3] * 6])
  pos = jnp.array([list(range(10)) + list(range(8)) + list(range(6))])
  tokens = jax.random.randint(jax.random.key(1), (1, 24), 0, cfg.vocab_size)
  packed = _logits(cfg, params, tokens, positions=pos, segment_ids=seg)
  # Changing document 1 and 3 leaves document 2 untouched ...
  other = tokens.at[:, :10].set(3).at[:, 18:].set(5)
  packed2 = _logits(cfg, params, other, positions=pos, segment_ids=seg)
  np.testing.assert_array_equal(packed[:, 10:18], packed2[:, 10:18])
  # ... and document 2 packed equals document 2 alone.
  alone = _logits(cfg, params, tokens[:, 10:18])
  np.testing.assert_allclose(packed[:, 10:18], alone, atol=1e-5)


def test_rope_equals_complex_rotation():
  cfg = tiny(rope_theta=500.0)
  x = jax.random.normal(jax.random.key(0), (2, 7, 3, 16))
  pos = jnp.array([[0, 1, 2, 3, 4, 5, 6], [9, 3, 100, 0, 7, 2, 1]])
  got = apply_rope(x, pos, inv_frequencies(cfg))
  # Dimension i pairs with i + 8 as the real and imaginary part of one complex number,
  # rotated by angle position * theta^(-2i/16).
  z = np.asarray(x[..., :8]) + 1j * np.asarray(x[..., 8:])
  freqs = 500.0 ** (-np.arange(0, 16, 2) / 16)
  rot = z * np.exp(1j * np.asarray(pos)[..., None, None] * freqs)
  want = np.concatenate([rot.real, rot.imag], axis=-1)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_llama3_rope_scaling_keeps_high_and_slows_low_frequencies():
  cfg = tiny(head_dim=128, rope_theta=500_000.0, rope_scaling='llama3', rope_scaling_factor=32.0)
  plain = inv_frequencies(dataclasses.replace(cfg, rope_scaling=''))
  scaled = inv_frequencies(cfg)
  wavelen = 2 * np.pi / plain
  np.testing.assert_array_equal(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
  np.testing.assert_allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 32, rtol=1e-6)


# Every family but 'qwen_bias_tied', whose q/k/v biases and tied head are in 'gpt2' (GQA in
# 'llama_gqa'): the bias is added before the cache write, whatever the head layout.
@pytest.mark.parametrize('name', sorted(set(FAMILIES) - {'qwen_bias_tied'}))
def test_kv_cache_decoding_equals_full_forward(name):
  cfg = FAMILIES[name]
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 20), 0, cfg.vocab_size)
  full = _logits(cfg, params, tokens)
  # Prefill prompts of lengths 7 and 4 (right-padded to 8), then one token at a time.
  lengths = jnp.array([7, 4])
  prompt = jnp.where(jnp.arange(8)[None] < lengths[:, None], tokens[:, :8], 0)
  cache = Cache.zeros(cfg, 2, 32)
  logits, cache = _apply(cfg)(params, prompt, cache=cache)
  cache = cache.replace(lengths=lengths)
  for b, n in enumerate([7, 4]):
    np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=1e-5)
  for _ in range(10):
    idx = cache.lengths
    nxt = jnp.take_along_axis(tokens, idx[:, None], axis=1)
    step_logits, cache = _apply(cfg)(params, nxt, cache=cache)
    want = jnp.take_along_axis(full, idx[:, None, None], axis=1)
    np.testing.assert_allclose(step_logits, want, atol=1e-5)


@pytest.mark.parametrize('remat', ['full', 'dots', 'qkv_proj'])
def test_remat_policies_give_the_same_gradients(remat):
  cfg = tiny()
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  # Jitted as a whole: grad of the jitted forward, op by op, compiles its pieces one by one.
  loss = lambda c: jax.jit(jax.grad(lambda p: _logits(c, p, tokens).sum()))(params)
  for a, b in zip(jax.tree.leaves(loss(cfg)), jax.tree.leaves(loss(dataclasses.replace(cfg, remat=remat)))):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_scanned_and_unscanned_models_agree():
  cfg = tiny()
  params = init_params(cfg, jax.random.key(0))
  unscanned = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(cfg.num_layers):
    unscanned[f'layer_{i}'] = jax.tree.map(lambda x: x[i], params['layers'])
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  np.testing.assert_allclose(
      _logits(cfg, params, tokens),
      _logits(dataclasses.replace(cfg, scan_layers=False), unscanned, tokens), atol=1e-5)


MASKS = {
    'causal': lambda b, t: Mask(causal=True),
    'window': lambda b, t: Mask(causal=True, sliding_window=3),
    'segments': lambda b, t: Mask(causal=True, q_segment_ids=jnp.array([[1] * 5 + [2] * 6 + [0] * 5] * b),
                                  kv_segment_ids=jnp.array([[1] * 5 + [2] * 6 + [0] * 5] * b)),
    'decode': lambda b, t: Mask(causal=True, q_offset=jnp.array([3, 0]), kv_lengths=jnp.array([9, 5])),
}


# Factorised, not a product: grouping is one reshape whatever the group size (no branch), and
# each mask kind is its own branch of Mask.dense; every mask and every group size (1 = no
# grouping, 2, 4) appears once or more.
@pytest.mark.parametrize('mask, groups', [('causal', 1), ('window', 2), ('segments', 4),
                                          ('decode', 2), ('causal', 4)])
def test_xla_attention_equals_reference(mask, groups):
  b, t, kv_heads, h = 2, 16, 2, 8
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, t, kv_heads * groups, h))
  k = jax.random.normal(ks[1], (b, t, kv_heads, h))
  v = jax.random.normal(ks[2], (b, t, kv_heads, h))
  m = MASKS[mask](b, t)
  np.testing.assert_allclose(xla_attention(q, k, v, m), reference_attention(q, k, v, m), atol=1e-5)
  # Jitted: op by op, the backward passes spend seconds compiling each primitive.
  grad = lambda f: jax.jit(jax.grad(lambda q, k, v: f(q, k, v, m).sum(), (0, 1, 2)))(q, k, v)
  g_ref, g_xla = grad(reference_attention), grad(xla_attention)
  for a, r in zip(g_xla, g_ref):
    np.testing.assert_allclose(a, r, atol=1e-4)


def test_padding_queries_get_zero_output():
  q = jnp.ones((1, 4, 2, 8))
  seg = jnp.array([[1, 1, 0, 0]])
  m = Mask(causal=True, q_segment_ids=seg, kv_segment_ids=jnp.array([[1, 1, 2, 2]]))
  out = xla_attention(q, q, q, m)
  np.testing.assert_array_equal(out[0, 2:], 0.0)


def test_model_config_from_dict_names_unknown_key():
  d = dataclasses.asdict(PRESETS['tiny'])
  d['num_head'] = 4
  with pytest.raises(ConfigError, match="model.num_head: unknown model key. Did you mean 'num_heads'"):
    ModelConfig.from_dict(d)


@pytest.mark.parametrize('key, registry', [
    ('norm', layers.NORMS), ('mlp', layers.MLPS), ('remat', transformer.REMAT_POLICIES)])
def test_config_accepts_exactly_the_names_the_implementations_register(key, registry):
  names = set(registry)
  assert len(names) >= 2
  base = get_preset('tiny', vocab_size=64)
  for name in names:
    dataclasses.replace(base, **{key: name}).validate()
  with pytest.raises(ConfigError, match=f"model.{key}='nope' is not one of"):
    dataclasses.replace(base, **{key: 'nope'}).validate()
  # The error lists the same names: nothing the config knows is missing from the registry.
  with pytest.raises(ConfigError) as e:
    dataclasses.replace(base, **{key: 'nope'}).validate()
  listed = set(ast.literal_eval(str(e.value).split('is not one of ')[1].split(']')[0] + ']'))
  assert listed == names


@pytest.mark.parametrize('out_dtype', ['bfloat16', 'float32'])
def test_projection_matmul_gradients_are_autodiffs_of_the_plain_dot(out_dtype):
  # layers.matmul: on the CPU, 16-bit operands with a 16-bit output take a custom backward
  # pass (materialized transposes, for XLA:CPU's fast matmuls); its dx and dw must be what
  # autodiff of the plain dot gives, up to float32 summation order, in every case.
  import jax.numpy as jnp
  from llmjax.models import layers
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (48, 32)).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (32, 40)).astype(jnp.bfloat16)
  g = jax.random.normal(kg, (48, 40))
  dt = jnp.dtype(out_dtype)

  def loss(mm):
    return lambda x, w: jnp.sum(mm(x, w).astype(dt).astype(jnp.float32) * g)

  ours = jax.jit(jax.grad(loss(lambda x, w: layers.matmul(x, w, dt)), argnums=(0, 1)))(x, w)
  plain = jax.jit(jax.grad(loss(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)),
                           argnums=(0, 1)))(x, w)
  for a, b in zip(ours, plain):
    assert a.dtype == b.dtype == jnp.bfloat16
    # One bfloat16 rounding apart at most (the float32 sums may round to neighbours).
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=2 ** -7, atol=1e-6)
  out = jax.jit(lambda x, w: layers.matmul(x, w, dt))(x, w)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, jnp.dot(x, w, preferred_element_type=jnp.float32))


@pytest.mark.parametrize('platform', ['cpu', 'tpu'])
def test_head_matmul_backward_rounds_the_float32_cotangent_once(platform):
  # layers.matmul(round_cotangent=True), the heads: float32 logits from bfloat16 operands; the
  # backward takes the logits' float32 cotangent rounded to bfloat16 (a TPU's default-precision
  # dot): dx and dw within one bfloat16 rounding of that product in numpy; 'tpu' lowers the non-CPU branch (plain transposes) as
  # `llmjax.plan` does, and its value is checked through the same jaxpr on the CPU.
  import jax.numpy as jnp
  from llmjax.models import layers
  kx, kw, kg = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (48, 32)).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (32, 40)).astype(jnp.bfloat16)
  g = jax.random.normal(kg, (48, 40))  # float32, not bfloat16-representable
  loss = lambda mm: lambda x, w: jnp.sum(mm(x, w) * g)
  if platform == 'cpu':
    head = lambda x, w: layers.matmul(x, w, jnp.float32, round_cotangent=True)
  else:
    head = lambda x, w: layers._matmul_16bit(x, w, False)  # the default= branch
    lowered = jax.jit(jax.grad(loss(lambda x, w: layers.matmul(
        x, w, jnp.float32, round_cotangent=True)), argnums=(0, 1))).trace(x, w).lower(
            lowering_platforms=('tpu',))
    assert 'transpose' in lowered.as_text()
  dx, dw = jax.jit(jax.grad(loss(head), argnums=(0, 1)))(x, w)
  g16 = np.asarray(g.astype(jnp.bfloat16), np.float32)
  x32, w32 = np.asarray(x, np.float32), np.asarray(w, np.float32)
  for ours, want in ((dx, g16 @ w32.T), (dw, x32.T @ g16)):
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32), want, rtol=2 ** -7, atol=1e-6)
  out = jax.jit(head)(x, w)  # the logits themselves: float32, unrounded
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, jnp.dot(x, w, preferred_element_type=jnp.float32))
