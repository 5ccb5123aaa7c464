"""The attention registry's kernel entries ('pallas', 'pallas_tpu', 'pallas_gpu', 'cudnn',
'auto'), the shard_map wrapper under a mesh, and a tiny model trained with the Pallas kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llmjax.models
from llmjax import config as config_lib
from llmjax import plan as plan_lib
from llmjax.errors import ConfigError
from llmjax.models.attention import IMPLEMENTATIONS, Mask, attention, xla_attention
from test_kernels_common import CASES, CAUSAL_SEGMENTS_GQA8, make


def test_registry_has_the_kernels():
  assert {'pallas', 'pallas_tpu', 'pallas_gpu', 'cudnn', 'auto'} <= set(IMPLEMENTATIONS)


def test_cudnn_off_gpu_is_a_one_line_config_error():
  q, k, v, mask, _ = make(CASES[0])
  with pytest.raises(ConfigError, match="model.attention='cudnn' needs an NVIDIA GPU") as e:
    attention(q, k, v, mask, implementation='cudnn')
  assert '\n' not in str(e.value)


def test_auto_on_cpu_is_xla():
  q, k, v, mask, _ = make(CASES[2])
  np.testing.assert_array_equal(attention(q, k, v, mask, implementation='auto'),
                                xla_attention(q, k, v, mask))


def test_pallas_entry_point_matches_xla_with_the_kernel_interpreted_on_cpu():
  q, k, v, mask, _ = make(CAUSAL_SEGMENTS_GQA8)
  out = jax.jit(lambda q, k, v: attention(q, k, v, mask, implementation='pallas'))(q, k, v)
  np.testing.assert_allclose(out, xla_attention(q, k, v, mask), atol=1e-5)


def test_decode_step_goes_to_the_decode_kernel(monkeypatch):
  from llmjax.kernels import decode_attention as decode_lib
  calls = []
  real = decode_lib.decode_attention
  monkeypatch.setattr(decode_lib, 'decode_attention',
                      lambda *a, **kw: calls.append(1) or real(*a, **kw))
  q, k, v, _, _ = make(CASES[0])
  lengths = jnp.array([17, 200])
  mask = Mask(causal=True, q_offset=lengths - 1, kv_lengths=lengths)
  out = attention(q[:, :1], k, v, mask, implementation='pallas')
  assert calls
  np.testing.assert_allclose(out, xla_attention(q[:, :1], k, v, mask), atol=1e-5)


def losses(attention_impl, steps=4):
  cfg = llmjax.models.get_preset('tiny', vocab_size=64, num_layers=2, embed_dim=64, num_heads=4,
                                 num_kv_heads=2, head_dim=16, mlp_dim=128,
                                 attention=attention_impl)
  model = llmjax.models.Transformer(cfg)
  params = llmjax.models.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 48), 0, 64)
  # Two packed documents in row 0, one document and padding in row 1.
  segment_ids = jnp.array([[1] * 30 + [2] * 18, [1] * 40 + [0] * 8], jnp.int32)
  opt = optax.adamw(3e-3)

  def loss_fn(p):
    logits, _ = model.apply({'params': p}, tokens[:, :-1], segment_ids=segment_ids[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    weights = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return jnp.sum(nll * weights) / jnp.sum(weights)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  state, out = opt.init(params), []
  for _ in range(steps):
    params, state, loss = step(params, state)
    out.append(float(loss))
  return np.array(out)


def test_tiny_model_trains_to_the_same_losses_with_pallas_as_with_xla():
  xla, pallas = losses('xla'), losses('pallas')
  assert xla[-1] < xla[0]
  np.testing.assert_allclose(pallas, xla, rtol=1e-4)


def test_train_step_with_pallas_aot_compiles_for_tpu_under_a_mesh():
  # plan.py compiles the real train step for v5e:2x2 under jax.set_mesh + the logical rules:
  # the Mosaic kernels must run inside shard_map (batch over data/fsdp, heads over tensor).
  c = config_lib.base_config('tiny', vocab_size=256, num_layers=2, embed_dim=64, num_heads=4,
                             num_kv_heads=2, head_dim=128, mlp_dim=128, max_seq_len=256)
  c.model.attention = 'pallas'
  c.data.seq_len = 256
  c.train.batch_size = 4
  c.mesh.update(fsdp=2, tensor=2)
  c.sharding.rules = 'fsdp_tensor'
  _, compiled = plan_lib.plan(c, 'v5e:2x2')
  assert compiled.as_text().count('tpu_custom_call') >= 3


def test_train_step_with_pallas_and_sequence_parallelism_aot_compiles_for_tpu():
  c = config_lib.base_config('tiny', vocab_size=256, num_layers=2, embed_dim=64, num_heads=4,
                             num_kv_heads=2, head_dim=128, mlp_dim=128, max_seq_len=512)
  c.model.attention = 'pallas'
  c.data.seq_len = 512
  c.train.batch_size = 2
  c.mesh.update(fsdp=2, sequence=2)
  _, compiled = plan_lib.plan(c, 'v5e:2x2')
  assert compiled.as_text().count('tpu_custom_call') >= 3


def test_shard_map_specs_follow_the_logical_rules():
  import flax.linen as nn
  from jax.sharding import AbstractMesh
  from llmjax.kernels import sharded
  from llmjax.sharding import FSDP_TENSOR
  mesh = AbstractMesh((2, 2, 2), ('data', 'fsdp', 'tensor'))
  q = jnp.zeros((4, 8, 4, 16))
  with nn.logical_axis_rules(FSDP_TENSOR):
    assert sharded.specs(q, jnp.zeros((4, 8, 2, 16)), mesh) == (('data', 'fsdp'), None,
                                                                ('tensor',))
    # One kv head can't be split 2 ways: heads stay whole so q head h still finds kv head h//G.
    assert sharded.specs(q, jnp.zeros((4, 8, 1, 16)), mesh) == (('data', 'fsdp'), None, None)
    # A batch the data axes don't divide stays whole too.
    assert sharded.specs(q[:3], jnp.zeros((3, 8, 2, 16)), mesh) == (None, None, ('tensor',))
    # Context parallelism: query positions split over `sequence` (K/V are gathered).
    seq_mesh = AbstractMesh((2, 2, 2), ('fsdp', 'sequence', 'tensor'))
    assert sharded.specs(q, jnp.zeros((4, 8, 2, 16)), seq_mesh) == (('fsdp',), ('sequence',),
                                                                    ('tensor',))
    # A decode step's single query cannot be split.
    assert sharded.specs(q[:, :1], jnp.zeros((4, 8, 2, 16)), seq_mesh)[1] is None


def test_auto_on_gpu_uses_cudnn_where_it_can_and_the_triton_kernel_elsewhere(monkeypatch):
  from llmjax.kernels import dispatch
  calls = []
  monkeypatch.setattr(dispatch.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(dispatch, 'cudnn', lambda *a, **kw: calls.append('cudnn'))
  monkeypatch.setattr(dispatch, 'pallas_gpu', lambda *a, **kw: calls.append('pallas_gpu'))
  q = jnp.zeros((1, 16, 4, 64), jnp.bfloat16)
  ids = jnp.ones((1, 16), jnp.int32)
  dispatch.auto(q, q, q, Mask(causal=True, sliding_window=8))
  dispatch.auto(q, q, q, Mask(q_segment_ids=ids, kv_segment_ids=ids))
  dispatch.auto(q.astype(jnp.float32), q, q, Mask())
  assert calls == ['cudnn', 'pallas_gpu', 'pallas_gpu']


def test_cudnn_on_gpu_rejects_masks_it_cannot_express(monkeypatch):
  from llmjax.kernels import dispatch
  monkeypatch.setattr(dispatch.jax, 'default_backend', lambda: 'gpu')
  q = jnp.zeros((1, 16, 4, 64), jnp.bfloat16)
  with pytest.raises(ConfigError, match='segment ids'):
    dispatch.cudnn(q, q, q, Mask(q_segment_ids=jnp.ones((1, 16), jnp.int32),
                                 kv_segment_ids=jnp.ones((1, 16), jnp.int32)))


# --- check_config: model.attention checked when the config is validated, not when tracing.

def _validate(platform=None, **model):
  c = config_lib.base_config('tiny', vocab_size=256, num_layers=2, embed_dim=64, num_heads=4,
                             num_kv_heads=2, head_dim=16, mlp_dim=128)
  c.model.update(model)
  return config_lib.validate(c, data_files=False, platform=platform)


def _one_line_error(match, **kwargs):
  with pytest.raises(ConfigError, match=match) as e:
    _validate(**kwargs)
  assert '\n' not in str(e.value)
  return str(e.value)


def test_validate_rejects_a_typo_in_model_attention_with_did_you_mean(monkeypatch):
  # Nothing may be traced or compiled before the error: jit is made to fail.
  monkeypatch.setattr(jax, 'jit', lambda *a, **kw: pytest.fail('compiled before the check'))
  msg = _one_line_error("model.attention='palas' is unknown", attention='palas')
  assert "Did you mean 'pallas'?" in msg


def test_validate_rejects_cudnn_on_cpu_before_compiling(monkeypatch):
  monkeypatch.setattr(jax, 'jit', lambda *a, **kw: pytest.fail('compiled before the check'))
  assert jax.default_backend() == 'cpu'
  _one_line_error("model.attention='cudnn' does not run on cpu.*use 'auto'", attention='cudnn')
  _one_line_error("model.attention='pallas_tpu' does not run on gpu", attention='pallas_tpu',
                  platform='gpu')
  _one_line_error("model.attention='pallas_gpu' does not run on tpu", attention='pallas_gpu',
                  platform='tpu')


@pytest.mark.parametrize('attention, platform, head_dim, dtype, match', [
    ('pallas_tpu', 'tpu', 192, 'float32', r'model.head_dim=192 \(the Mosaic kernels need'),
    ('pallas', 'tpu', 192, 'float32', 'model.head_dim=192'),
    ('pallas', 'cpu', 192, 'float32', 'model.head_dim=192'),  # the TPU kernel, interpreted
    ('pallas_gpu', 'gpu', 96, 'float32', r'model.head_dim=96 \(the Triton kernel needs a power'),
    ('pallas', 'gpu', 96, 'float32', 'model.head_dim=96'),
    ('cudnn', 'gpu', 256, 'bfloat16', r'model.head_dim=256 \(cuDNN needs <= 128'),
    ('cudnn', 'gpu', 64, 'float32', r"model.dtype='float32' \(cuDNN flash attention takes"),
])
def test_validate_rejects_shapes_the_kernel_cannot_take(attention, platform, head_dim, dtype,
                                                        match):
  _one_line_error(match, attention=attention, platform=platform, head_dim=head_dim,
                  dtype=dtype)


@pytest.mark.parametrize('attention, platform, head_dim, dtype', [
    ('pallas_tpu', 'tpu', 256, 'float32'),
    ('pallas_tpu', 'tpu', 64, 'float32'),
    ('pallas', 'gpu', 128, 'float32'),
    ('pallas_gpu', 'cpu', 64, 'float32'),
    ('cudnn', 'gpu', 128, 'bfloat16'),
    ('auto', 'tpu', 192, 'float32'),  # auto falls back to XLA where the kernel can't
    ('auto', 'gpu', 96, 'float32'),
    ('xla', 'tpu', 200, 'float32'),
])
def test_validate_accepts_what_the_kernels_take(attention, platform, head_dim, dtype):
  _validate(attention=attention, platform=platform, head_dim=head_dim, dtype=dtype)


def test_check_config_knows_exactly_the_registry():
  from llmjax.kernels import dispatch
  assert set(dispatch.RUNS_ON) == set(IMPLEMENTATIONS)
  for name in IMPLEMENTATIONS:  # each name runs somewhere, and is accepted there
    for platform in dispatch.RUNS_ON[name]:
      _validate(attention=name, platform=platform, head_dim=64, dtype='bfloat16')


def test_the_kernels_trace_time_limits_agree_with_check_config():
  from llmjax.kernels import flash_attention_gpu, flash_attention_tpu
  q = jnp.zeros((1, 8, 2, 192))
  with pytest.raises(ValueError, match='head_dim=192'):
    flash_attention_tpu.flash_attention(q, q, q, Mask(), interpret=True)
  with pytest.raises(ConfigError, match='head_dim=192'):
    _validate(attention='pallas_tpu', head_dim=192)
  q = jnp.zeros((1, 8, 2, 96))
  with pytest.raises(ValueError, match='head_dim=96'):
    flash_attention_gpu.flash_attention(q, q, q, Mask(), interpret=True)
  with pytest.raises(ConfigError, match='head_dim=96'):
    _validate(attention='pallas_gpu', head_dim=96)


def test_plan_checks_the_kernel_for_tpu_not_for_this_host():
  # plan compiles for TPU from a CPU host: the Triton kernel is refused there, before compiling.
  c = config_lib.base_config('tiny', vocab_size=256, num_layers=2, embed_dim=64, num_heads=4,
                             num_kv_heads=2, head_dim=16, mlp_dim=128)
  c.model.attention = 'pallas_gpu'
  _validate(attention='pallas_gpu')  # fine for this CPU host (interpreted)
  with pytest.raises(ConfigError, match="model.attention='pallas_gpu' does not run on tpu"):
    plan_lib.plan(c, 'v5e:2x2')


def test_auto_falls_back_to_xla_where_the_platform_kernel_cannot_take_head_dim(monkeypatch):
  from llmjax.kernels import dispatch
  calls = []
  monkeypatch.setattr(dispatch, 'pallas_tpu', lambda *a, **kw: calls.append('pallas_tpu'))
  monkeypatch.setattr(dispatch, 'pallas_gpu', lambda *a, **kw: calls.append('pallas_gpu'))
  monkeypatch.setattr(dispatch, 'xla_attention', lambda *a, **kw: calls.append('xla'))
  for backend, head_dim in (('tpu', 128), ('tpu', 192), ('gpu', 64), ('gpu', 96)):
    monkeypatch.setattr(dispatch.jax, 'default_backend', lambda: backend)
    q = jnp.zeros((1, 16, 4, head_dim))  # float32: cuDNN can't, so GPU goes to Triton or XLA
    dispatch.auto(q, q, q, Mask())
  assert calls == ['pallas_tpu', 'xla', 'pallas_gpu', 'xla']


@pytest.mark.parametrize('mask_kind', ['causal', 'documents', 'window', 'padded'])
def test_xla_attention_by_causal_blocks_equals_the_float32_reference(mask_kind):
  """512 tokens: xla_attention runs 4 query blocks of CAUSAL_BLOCK, each over the keys up to
  its end; the output and the gradients equal `reference_attention` (the dense float32 oracle),
  also with packed documents, a sliding window and padding (keys past kv_lengths)."""
  from llmjax.kernels import reference
  b, t, n, kv, h = 2, 4 * reference.CAUSAL_BLOCK, 4, 2, 16
  kq, kk, kv_, kw = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(kq, (b, t, n, h))
  k = jax.random.normal(kk, (b, t, kv, h))
  v = jax.random.normal(kv_, (b, t, kv, h))
  w = jax.random.normal(kw, (b, t, n, h))
  seg = jnp.concatenate([jnp.full((b, 200), 1), jnp.full((b, 250), 2),
                         jnp.zeros((b, t - 450), jnp.int32)], 1).astype(jnp.int32)
  mask = {'causal': Mask(),
          'documents': Mask(q_segment_ids=seg, kv_segment_ids=seg),
          'window': Mask(sliding_window=100, q_segment_ids=seg, kv_segment_ids=seg),
          'padded': Mask(kv_lengths=jnp.array([t, 300]))}[mask_kind]
  blocks = []
  real_dense = reference._dense
  spy = lambda q, *a: blocks.append(q.shape[1]) or real_dense(q, *a)
  loss = lambda attn: lambda q, k, v: jnp.sum(attn(q, k, v, mask) * w)
  reference._dense = spy
  try:
    ours = jax.value_and_grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
  finally:
    reference._dense = real_dense
  assert blocks == [reference.CAUSAL_BLOCK] * 4  # the blocked path ran, not the dense one
  want = jax.value_and_grad(loss(reference.reference_attention), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(ours[0], want[0], rtol=1e-5)
  for a, r in zip(ours[1], want[1]):
    np.testing.assert_allclose(a, r, atol=2e-5)
