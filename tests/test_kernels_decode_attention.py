"""llmjax.kernels.decode_attention: one query token against a KV cache, in the TPU interpreter
against the reference; AOT compilation for TPU; and the model's decode path with 'pallas'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import llmjax.models
from llmjax.kernels import decode_attention as da
from llmjax.models.attention import Mask, reference_attention, xla_attention
from test_kernels_common import TOPOLOGIES, tpu_mesh


@pytest.mark.parametrize('dtype, heads, kv_heads, head_dim, max_len, window', [
    ('float32', 4, 4, 64, 300, 0),     # MHA, cache not a multiple of the block
    ('float32', 8, 4, 128, 256, 0),    # GQA 2
    ('float32', 8, 2, 64, 384, 100),   # GQA 4, sliding window
    ('bfloat16', 8, 1, 128, 256, 0),   # MQA (GQA 8)
])
def test_matches_reference(dtype, heads, kv_heads, head_dim, max_len, window):
  batch = 4
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(kq, (batch, 1, heads, head_dim)).astype(dtype)
  k = jax.random.normal(kk, (batch, max_len, kv_heads, head_dim)).astype(dtype)
  v = jax.random.normal(kv, (batch, max_len, kv_heads, head_dim)).astype(dtype)
  # Lengths: 1, inside a block, exactly a block, the whole cache.
  lengths = jnp.array([1, 77, 128, max_len], jnp.int32)
  mask = Mask(causal=True, sliding_window=window, q_offset=lengths - 1, kv_lengths=lengths)
  out = jax.jit(lambda q, k, v: da.decode_attention(
      q, k, v, mask, block_sizes=da.BlockSizes(block_k=128), interpret=True))(q, k, v)
  f32 = lambda x: x.astype(jnp.float32)
  ref = reference_attention(f32(q), f32(k), f32(v), mask)
  err = float(jnp.max(jnp.abs(f32(out) - ref)))
  if dtype == 'float32':
    assert err <= 1e-5
  else:  # see test_kernels_common: c * the bf16 XLA error + atol
    base = float(jnp.max(jnp.abs(f32(xla_attention(q, k, v, mask)) - ref)))
    assert err <= 2 * base + 2e-3, (err, base)


def test_log_sum_exp_is_the_masked_scores_logsumexp():
  # What a cache split over devices combines by (`sharded.shard_decode_attention`).
  batch, heads, kv_heads, head_dim, s = 4, 4, 2, 64, 256
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(1), 3)
  q = jax.random.normal(kq, (batch, 1, heads, head_dim))
  k = jax.random.normal(kk, (batch, s, kv_heads, head_dim))
  v = jax.random.normal(kv, (batch, s, kv_heads, head_dim))
  lengths = jnp.array([0, 3, 130, 256], jnp.int32)
  mask = Mask(causal=True, sliding_window=100, q_offset=jnp.maximum(lengths - 1, 0),
              kv_lengths=lengths)
  out, lse = da.decode_attention(q, k, v, mask, block_sizes=da.BlockSizes(block_k=64),
                                 interpret=True, return_lse=True)
  np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=1e-5)
  kh = jnp.repeat(k, heads // kv_heads, axis=2)  # query head h -> kv head h // group
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, kh) / np.sqrt(head_dim)  # [B, heads, 1, S]
  visible = mask.dense(1, s)[:, None]  # [B, 1, 1, S]
  ref = jax.scipy.special.logsumexp(jnp.where(visible, scores, -jnp.inf), axis=-1)
  ref = ref.transpose(0, 2, 1)  # [B, 1, heads]
  assert lse.shape == (batch, 1, heads)
  assert np.all(np.isneginf(lse[0]))  # an empty row: no key, weight 0 when combined
  np.testing.assert_allclose(lse[1:], ref[1:], atol=1e-5)


def test_empty_cache_gives_zeros():
  q = jnp.ones((2, 1, 4, 64))
  k = jnp.ones((2, 128, 2, 64))
  out = da.decode_attention(q, k, k, Mask(causal=False, kv_lengths=jnp.array([0, 3])),
                            interpret=True)
  assert not np.any(out[0]) and np.allclose(out[1], 1.0)


@pytest.mark.parametrize('topology', TOPOLOGIES)
def test_compiles_for_tpu(topology):
  mesh, _ = tpu_mesh(topology)
  batch, max_len, heads, kv_heads, head_dim = 2 * mesh.size, 2048, 32, 8, 128

  def per_device(q, k, v, lengths):
    mask = Mask(causal=True, sliding_window=1024, q_offset=lengths - 1, kv_lengths=lengths)
    return da.decode_attention(q, k, v, mask, interpret=False)

  f = jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'),) * 4, out_specs=P('data'))
  spec = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  compiled = jax.jit(f).lower(
      spec(batch, 1, heads, head_dim), spec(batch, max_len, kv_heads, head_dim),
      spec(batch, max_len, kv_heads, head_dim), spec(batch, dtype=jnp.int32)).compile()
  assert 'tpu_custom_call' in compiled.as_text()


def test_a_cache_split_along_its_slots_compiles_for_tpu_without_gathering_it():
  import flax.linen as nn
  from jax.experimental import topologies
  from jax.sharding import AxisType, Mesh
  from llmjax import sharding
  from llmjax.kernels import sharded
  topo = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2')
  mesh = Mesh(np.array(topo.devices).reshape(1, 1, 4, 1, 1), sharding.MESH_AXES,
              axis_types=(AxisType.Auto,) * 5)
  batch, max_len, heads, kv_heads, head_dim = 2, 8192, 32, 8, 128

  def step(q, k, v, lengths):
    mask = Mask(causal=True, q_offset=lengths - 1, kv_lengths=lengths)
    return sharded.shard_decode_attention(
        lambda *a, **kw: da.decode_attention(*a, interpret=False, **kw), q, k, v, mask)

  spec = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  cache = jax.sharding.NamedSharding(mesh, P(None, 'sequence'))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.FSDP):
    compiled = jax.jit(step, in_shardings=(None, cache, cache, None)).lower(
        spec(batch, 1, heads, head_dim), spec(batch, max_len, kv_heads, head_dim),
        spec(batch, max_len, kv_heads, head_dim), spec(batch, dtype=jnp.int32)).compile()
  text = compiled.as_text()
  assert 'tpu_custom_call' in text
  assert 'all-gather' not in text  # only the [batch, heads] statistics and outputs are reduced
  # Each device holds a quarter of the 2 x 8192-slot cache (k and v).
  cache_bytes = 2 * batch * max_len * kv_heads * head_dim * 2
  assert compiled.memory_analysis().argument_size_in_bytes < cache_bytes / 4 + (1 << 20)


def test_model_decodes_the_same_with_pallas_as_with_xla():
  # Prefill 5 tokens (flash kernel with q_offset/kv_lengths), then 3 single-token decode steps
  # (decode kernel), against the same with XLA attention.
  def run(impl):
    cfg = llmjax.models.get_preset('tiny', vocab_size=64, num_layers=2, embed_dim=64,
                                   num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                                   attention=impl)
    model = llmjax.models.Transformer(cfg)
    params = llmjax.models.init_params(cfg, jax.random.PRNGKey(0))
    apply = jax.jit(lambda p, t, c: model.apply({'params': p}, t, cache=c))
    cache = llmjax.models.Cache.zeros(cfg, batch=2, max_len=16, dtype=jnp.float32)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 64)
    logits, cache = apply(params, tokens, cache)
    out = [logits]
    for _ in range(3):
      logits, cache = apply(params, jnp.argmax(logits[:, -1:], -1), cache)
      out.append(logits)
    return jnp.concatenate(out, axis=1)

  np.testing.assert_allclose(run('pallas'), run('xla'), atol=1e-4, rtol=1e-4)


# --- Cache length: whole kernel blocks, so a decode step reads the cache in place.

def _primitives(fn, *args):
  """Primitives of fn's jaxpr, inside nested jits too, but not inside the kernel itself."""
  names = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      if eqn.primitive.name == 'pallas_call':
        continue
      for value in eqn.params.values():
        if isinstance(value, jax.extend.core.ClosedJaxpr):
          walk(value.jaxpr)
        elif isinstance(value, jax.extend.core.Jaxpr):
          walk(value)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


@pytest.mark.parametrize('n', [1, 7, 64, 300, 512, 513, 600, 1024, 1500, 4096])
def test_cache_length_is_whole_blocks(n):
  block = da.BlockSizes().block_k
  c = da.cache_length(n)
  assert n <= c < n + block
  if n > block:
    assert c % block == 0
  else:  # one block of the whole cache, rounded to sublanes
    assert c % 8 == 0 and c - n < 8
  assert da.cache_length(c) == c  # already aligned: unchanged


@pytest.mark.parametrize('s, pads', [(600, True), (da.cache_length(600), False), (300, True),
                                     (da.cache_length(300), False)])
def test_decode_pads_the_cache_only_when_it_is_not_whole_blocks(s, pads):
  # A pad of the [batch, s, kv_heads, head_dim] cache is a copy of all of it every step.
  q = jnp.zeros((2, 1, 4, 64))
  k = jnp.zeros((2, s, 2, 64))
  mask = Mask(causal=True, q_offset=jnp.array([3, 5]), kv_lengths=jnp.array([4, 6]))
  prims = _primitives(
      lambda q, k, v: da.decode_attention(q, k, v, mask, interpret=True), q, k, k)
  assert ('pad' in prims) == pads, prims
  assert 'pallas_call' in prims


def test_dispatch_cache_length_rounds_only_where_the_decode_kernel_runs():
  import types
  from llmjax.kernels import dispatch
  cfg = lambda attention, head_dim=64: types.SimpleNamespace(attention=attention,
                                                              head_dim=head_dim)
  n, aligned = 600, da.cache_length(600)
  assert aligned != n
  assert dispatch.cache_length(n, cfg('pallas_tpu'), 'tpu') == aligned
  assert dispatch.cache_length(n, cfg('pallas_tpu'), 'cpu') == aligned  # interpreted
  assert dispatch.cache_length(n, cfg('pallas'), 'tpu') == aligned
  assert dispatch.cache_length(n, cfg('auto'), 'tpu') == aligned
  # XLA reads every slot: a longer cache would cost it work. The Triton kernel pads to 64s.
  assert dispatch.cache_length(n, cfg('auto'), 'cpu') == n
  assert dispatch.cache_length(n, cfg('auto', head_dim=192), 'tpu') == n  # auto -> XLA there
  assert dispatch.cache_length(n, cfg('xla'), 'tpu') == n
  assert dispatch.cache_length(n, cfg('pallas'), 'gpu') == n


@pytest.mark.parametrize('dtype, heads, kv_heads', [('float32', 4, 2), ('float32', 8, 1),
                                                    ('bfloat16', 4, 4)])
def test_xla_one_query_matches_reference(dtype, heads, kv_heads):
  # `xla_attention`'s decode form (one query, several rows: multiply-reduces over the cache),
  # with an empty row (zero output), a sliding window and a fully visible cache.
  batch, head_dim, s = 4, 32, 96
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(2), 3)
  q = jax.random.normal(kq, (batch, 1, heads, head_dim)).astype(dtype)
  k = jax.random.normal(kk, (batch, s, kv_heads, head_dim)).astype(dtype)
  v = jax.random.normal(kv, (batch, s, kv_heads, head_dim)).astype(dtype)
  lengths = jnp.array([0, 5, 70, s], jnp.int32)
  for window in (0, 16):
    mask = Mask(causal=True, sliding_window=window, q_offset=jnp.maximum(lengths - 1, 0),
                kv_lengths=lengths)
    out = jax.jit(xla_attention)(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    f32 = lambda x: x.astype(jnp.float32)
    ref = reference_attention(f32(q), f32(k), f32(v), mask)
    np.testing.assert_allclose(f32(out), ref, atol=1e-5 if dtype == 'float32' else 2e-2)
    assert not np.any(np.asarray(out[0]))  # the empty row
