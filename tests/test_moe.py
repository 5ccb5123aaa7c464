"""Mixture of experts: routing, the dropless and capacity expert computations against a dense
reference, the router losses against a numpy port of transformers' load_balancing_loss_func,
the presets' parameter counts, training, KV-cache decoding and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import config as config_lib
from llmjax import sharding
from llmjax.errors import ConfigError
from llmjax.models import moe
from llmjax.models.config import ModelConfig, get_preset
from llmjax.models.transformer import Cache, Transformer, init_params
from llmjax.train import losses
from llmjax.train.loop import make_trainer


def _experts(key, e=4, d=8, f=16):
  k1, k2, k3 = jax.random.split(key, 3)
  return (jax.random.normal(k1, (e, d, f)) * 0.3, jax.random.normal(k2, (e, d, f)) * 0.3,
          jax.random.normal(k3, (e, f, d)) * 0.3)


def _dense_reference(x, logits, k, norm, w_gate, w_up, w_down):
  """Every expert on every token ([tokens, experts, embed]: fine at test sizes), masked by the
  gates scattered to [tokens, experts]."""
  idx, gates, _ = moe.route(logits, k, norm)
  h = jax.nn.silu(jnp.einsum('nd,edf->nef', x, w_gate)) * jnp.einsum('nd,edf->nef', x, w_up)
  y = jnp.einsum('nef,efd->ned', h, w_down)
  dense_gates = jnp.zeros(logits.shape).at[jnp.arange(x.shape[0])[:, None], idx].set(gates)
  return jnp.einsum('ned,ne->nd', y, dense_gates)


@pytest.mark.parametrize('norm', [True, False])
def test_dropless_equals_dense_reference_forward_and_grads(norm):
  kx, kl, kw = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (13, 8))
  logits = jax.random.normal(kl, (13, 4))
  weights = _experts(kw)

  def sparse(x, logits, *w):
    idx, gates, _ = moe.route(logits, 2, norm)
    return moe.dropless(x, idx, gates, *w)

  ref = lambda x, logits, *w: _dense_reference(x, logits, 2, norm, *w)
  np.testing.assert_allclose(sparse(x, logits, *weights), ref(x, logits, *weights), atol=1e-5)
  probe = jax.random.normal(jax.random.key(9), (13, 8))
  loss = lambda f: lambda *a: jnp.sum(f(*a) * probe)
  g_sparse = jax.jit(jax.grad(loss(sparse), argnums=(0, 1, 2, 3, 4)))(x, logits, *weights)
  g_ref = jax.grad(loss(ref), argnums=(0, 1, 2, 3, 4))(x, logits, *weights)
  for a, b in zip(g_sparse, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_capacity_equals_dropless_when_nothing_dropped():
  kx, kl, kw = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (10, 8))
  idx, gates, _ = moe.route(jax.random.normal(kl, (10, 4)), 2, True)
  weights = _experts(kw)
  # factor experts / k: capacity = every token, nothing can be dropped.
  y, dropped = moe.with_capacity(x, idx, gates, *weights, capacity_factor=2.0)
  np.testing.assert_allclose(y, moe.dropless(x, idx, gates, *weights), atol=1e-5)
  assert float(dropped) == 0.0


def test_capacity_drops_and_counts_the_overflow():
  x = jax.random.normal(jax.random.key(2), (8, 8))
  weights = _experts(jax.random.key(3))
  idx = jnp.tile(jnp.array([[0, 1]]), (8, 1))  # every token wants experts 0 and 1
  gates = jnp.full((8, 2), 0.5)
  # capacity = ceil(1.0 * 8 * 2 / 4) = 4: experts 0 and 1 each take tokens 0..3 (token order).
  assert moe.capacity(8, 2, 4, 1.0) == 4
  y, dropped = moe.with_capacity(x, idx, gates, *weights, capacity_factor=1.0)
  assert float(dropped) == 8.0
  full = moe.dropless(x, idx, gates, *weights)
  np.testing.assert_allclose(y[:4], full[:4], atol=1e-5)
  np.testing.assert_allclose(y[4:], 0.0, atol=1e-7)


def test_route_gates_per_family():
  logits = np.array([[2.0, -1.0, 0.5, 1.5], [0.0, 3.0, 3.5, -2.0]], np.float32)
  k = 2
  top = np.argsort(-logits, axis=-1)[:, :k]
  # Mixtral: softmax over the top-k logits.
  sel = np.take_along_axis(logits, top, -1)
  mixtral = np.exp(sel) / np.exp(sel).sum(-1, keepdims=True)
  # Qwen2-MoE (norm_topk_prob=False): the full softmax's probabilities at the top k.
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  qwen2 = np.take_along_axis(probs, top, -1)
  idx, gates, p = moe.route(jnp.asarray(logits), k, norm_topk_prob=True)
  np.testing.assert_array_equal(idx, top)
  np.testing.assert_allclose(gates, mixtral, rtol=1e-6)
  np.testing.assert_allclose(p, probs, rtol=1e-6)
  idx, gates, _ = moe.route(jnp.asarray(logits), k, norm_topk_prob=False)
  np.testing.assert_allclose(gates, qwen2, rtol=1e-6)


def hf_load_balancing_loss(gate_logits, num_experts, top_k, attention_mask=None):
  """numpy port of transformers' load_balancing_loss_func (models/mixtral/modeling_mixtral.py):
  gate_logits: list over layers of [batch * length, experts]; attention_mask [batch, length]."""
  cat = np.concatenate(gate_logits, 0)
  rw = np.exp(cat - cat.max(-1, keepdims=True))
  rw /= rw.sum(-1, keepdims=True)
  selected = np.argsort(-rw, axis=-1, kind='stable')[:, :top_k]
  expert_mask = np.eye(num_experts)[selected]  # [N, k, E]
  if attention_mask is None:
    tokens_per_expert = expert_mask.mean(0)
    router_prob_per_expert = rw.mean(0)
  else:
    b, t = attention_mask.shape
    layers = cat.shape[0] // (b * t)
    eam = np.broadcast_to(attention_mask[None, :, :, None, None],
                          (layers, b, t, top_k, num_experts)).reshape(-1, top_k, num_experts)
    tokens_per_expert = (expert_mask * eam).sum(0) / eam.sum(0)
    ram = np.broadcast_to(attention_mask[None, :, :, None],
                          (layers, b, t, num_experts)).reshape(-1, num_experts)
    router_prob_per_expert = (rw * ram).sum(0) / ram.sum(0)
  return float((tokens_per_expert * router_prob_per_expert[None]).sum() * num_experts)


def test_router_losses_equal_transformers_per_row():
  """Three MoE layers on two rows, the second half padding: each row's aux loss is HF's at
  batch 1 on its valid tokens, and the sums weight each row by its loss tokens."""
  cfg = get_preset('tiny-moe', vocab_size=64, embed_dim=16, num_heads=2, num_kv_heads=1,
                   head_dim=8, moe_mlp_dim=8, num_experts=6, num_experts_per_tok=2)
  layer = moe.MoE(cfg)
  b, t, e = 2, 5, 6
  valid = np.ones((b, t), bool)
  valid[1, 3:] = False
  stats, gate_logits = [], []
  for i in range(3):
    x = jax.random.normal(jax.random.key(i), (b, t, 16))
    params = nn.meta.unbox(layer.init(jax.random.key(10 + i), x)['params'])
    _, aux = layer.apply({'params': params}, x, jnp.asarray(valid), mutable=['aux'])
    stats.append(aux)
    gate_logits.append(np.asarray(x).reshape(b * t, 16) @ np.asarray(params['router']['kernel']))
  stacked = moe.router_stats(stats)
  assert stacked.counts.shape == (3, b, e)
  row_weight = jnp.array([4.0, 2.0])
  router = losses.RouterLoss(aux_coef=0.1, z_coef=0.01, num_experts=e, top_k=2)
  extra, metrics = losses.moe_losses(stacked, row_weight, router, b * t)
  want_aux, want_z = [], []
  for r in range(b):
    rows = [g.reshape(b, t, e)[r][valid[r]] for g in gate_logits]
    want_aux.append(hf_load_balancing_loss(rows, e, 2))
    cat = np.concatenate(rows, 0)
    lse = np.log(np.exp(cat).sum(-1))
    want_z.append(np.mean(lse ** 2))
  # The masked HF form on one padded row is the same as HF on its valid tokens.
  row1 = [g.reshape(b, t, e)[1] for g in gate_logits]
  np.testing.assert_allclose(hf_load_balancing_loss(row1, e, 2, valid[1:].astype(float)),
                             want_aux[1], rtol=1e-6)
  np.testing.assert_allclose(metrics['aux_loss'], 4 * want_aux[0] + 2 * want_aux[1], rtol=1e-5)
  np.testing.assert_allclose(metrics['router_z_loss'], 4 * want_z[0] + 2 * want_z[1], rtol=1e-5)
  np.testing.assert_allclose(extra, 0.1 * metrics['aux_loss'] + 0.01 * metrics['router_z_loss'],
                             rtol=1e-6)
  load = np.array([metrics[f'expert_load/{i}'][0] for i in range(e)])
  assert load.sum() == 3 * 2 * valid.sum()  # layers x k x valid tokens


PUBLISHED = {  # total, active (from the HF configs' shapes: what transformers would create)
    'mixtral-8x7b': (46_702_792_704, 12_879_925_248),
    'qwen1.5-moe-a2.7b': (14_315_784_192, 2_689_173_504),
    'qwen3-30b-a3b': (30_532_122_624, 3_353_032_704),
}


@pytest.mark.parametrize('name', list(PUBLISHED))
def test_preset_parameter_counts(name):
  cfg = get_preset(name)
  assert (cfg.num_params, cfg.num_active_params) == PUBLISHED[name]
  # MFU counts what a token runs through: 6 x (active - input embedding) + attention.
  t = 4096
  want = 6 * (PUBLISHED[name][1] - cfg.vocab_size * cfg.embed_dim) + 12 * cfg.num_layers * (
      cfg.num_heads * cfg.head_dim * t)
  assert cfg.flops_per_token(t) == want


MIXED = dict(num_layers=5, decoder_sparse_step=2, mlp_only_layers=(3,), shared_expert_mlp_dim=48,
             qk_norm=True, norm_topk_prob=False)


def _small(**kw):
  return get_preset('tiny-moe', vocab_size=64, embed_dim=32, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, moe_mlp_dim=16, **kw)


@pytest.mark.parametrize('kw', [dict(scan_layers=True), dict(MIXED, scan_layers=True),
                                dict(MIXED, scan_layers=False)])
def test_param_count_matches_the_params(kw):
  cfg = _small(**kw)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == cfg.num_params
  if kw == dict(MIXED, scan_layers=True):  # [dense, moe] x 1, [dense, dense], [dense, moe]
    assert cfg.layer_groups() == ((0, 1, (False, True)), (2, 1, (False, False)), (4, 1, (False,)))
    assert sorted(shapes) == ['embed', 'final_norm', 'head', 'layers_0', 'layers_1', 'layers_2']
  assert cfg.num_active_params < cfg.num_params


@pytest.mark.parametrize('kw', [
    pytest.param(dict(scan_layers=True), marks=pytest.mark.slow), dict(MIXED, scan_layers=True),
    pytest.param(dict(MIXED, scan_layers=False), marks=pytest.mark.slow)])
def test_kv_cache_decode_equals_full_forward(kw):
  cfg = _small(**kw)
  # Jitted, one compile: op by op, the MoE init compiles each of its primitives.
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)

  @jax.jit
  def both(params, tokens):
    full, _ = model.apply({'params': params}, tokens)
    logits, cache = model.apply({'params': params}, tokens[:, :8], cache=Cache.zeros(cfg, 2, 12))
    steps = [logits]
    for i in range(8, 9):  # the router runs on the decode token alone
      logits, cache = model.apply({'params': params}, tokens[:, i:i + 1], cache=cache)
      steps.append(logits)
    return full, jnp.concatenate(steps, axis=1)

  full, decoded = both(params, tokens)
  np.testing.assert_allclose(decoded, full, atol=2e-5)


def _config(**model):
  c = config_lib.base_config('tiny-moe', vocab_size=64, num_layers=2, embed_dim=32, num_heads=4,
                             num_kv_heads=2, head_dim=8, mlp_dim=64, moe_mlp_dim=16,
                             max_seq_len=64, router_z_loss_coef=0.001, **model)
  c.train.update(dict(steps=30, lr=3e-3, warmup_steps=5, weight_decay=0.0, batch_size=4))
  return c


def _trainer(c):
  cfg = ModelConfig.from_dict(c.model)
  return cfg, make_trainer(c, cfg, sharding.make_mesh(c.mesh), sharding.rules_from_config(c))


def _batch(rows):
  b, t1 = rows.shape
  return {'inputs': jnp.asarray(rows[:, :-1], jnp.int32),
          'targets': jnp.asarray(rows[:, 1:], jnp.int32),
          'segment_ids': jnp.ones((b, t1 - 1), jnp.int32),
          'positions': jnp.broadcast_to(jnp.arange(t1 - 1, dtype=jnp.int32), (b, t1 - 1)),
          'loss_mask': jnp.ones((b, t1 - 1), jnp.float32)}


def test_tiny_moe_trains_with_router_losses_and_grad_accum_is_exact():
  seq = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2])
  batch = _batch(np.stack([np.roll(seq, i) for i in range(4)]))
  batch['loss_mask'] = batch['loss_mask'].at[0, :9].set(0.0)  # rows of unequal weight
  _, tr = _trainer(_config())
  state = tr.init(jax.random.key(0))
  first = None
  for _ in range(20):
    state, m = tr.train_step(state, batch)
    first = first or {k: float(v) for k, v in m.items()}
  assert float(m['loss']) < 0.65 * first['loss'], (first['loss'], float(m['loss']))
  # The router losses are in the loss: a uniform router's aux loss is ~k (= 2 here).
  assert 1.5 < first['aux_loss'] < 3.0 and first['router_z_loss'] > 0
  assert first['moe_dropped'] == 0.0
  loads = [first[f'expert_load/{e}'] for e in range(8)]
  np.testing.assert_allclose(sum(loads), 1.0, rtol=1e-5)

  # The router losses are sums weighted per row, so 2 micro-batches give the same step.
  results = []
  for accum in (1, 2):
    if accum > 1:
      c = _config()
      c.train.grad_accum = accum
      _, tr = _trainer(c)
    s = tr.init(jax.random.key(0))
    s, m = tr.train_step(s, batch)
    results.append((m, s.params))
  for key in ('loss', 'aux_loss', 'router_z_loss'):
    np.testing.assert_allclose(results[0][0][key], results[1][0][key], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_lora_on_the_attention_of_an_moe_model_trains_only_adapters():
  c = _config(lora_rank=4, lora_targets=('q', 'k', 'v', 'o'))
  _, tr = _trainer(c)
  state = tr.init(jax.random.key(0))
  from flax import traverse_util
  from llmjax.models import lora
  before = traverse_util.flatten_dict(jax.device_get(state.params))  # the step donates state
  seq = np.arange(17) % 7
  state2, m = tr.train_step(state, _batch(np.stack([seq] * 4)))
  state2, m = tr.train_step(state2, _batch(np.stack([seq] * 4)))  # step 0's warmup lr is 0
  assert np.isfinite(float(m['loss'])) and 'aux_loss' in m
  after = traverse_util.flatten_dict(jax.device_get(state2.params))
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed and all(lora.is_adapter(p) for p in changed), changed
  assert any('moe' in p for p in before)


def test_bad_moe_input_is_a_one_line_error():
  with pytest.raises(ConfigError, match='num_experts_per_tok=9 must be between 1 and'):
    get_preset('tiny-moe', num_experts_per_tok=9)
  with pytest.raises(ConfigError, match='LoRA on MoE experts'):
    get_preset('tiny-moe', lora_rank=4)
  with pytest.raises(ConfigError, match='mlp_only_layers names layer 7'):
    get_preset('tiny-moe', mlp_only_layers=(7,))
  with pytest.raises(ConfigError, match='shared_expert_mlp_dim is set but model.num_experts=0'):
    get_preset('tiny', shared_expert_mlp_dim=8)
  from llmjax.interop import hf
  with pytest.raises(ConfigError, match='LlamaForCausalLM has no experts but model.num_experts=8'):
    hf.config_to_hf(get_preset('tiny-moe'), 'LlamaForCausalLM')
  c = _config()
  c.mesh.update(fsdp=1, expert=3)
  with pytest.raises(ConfigError, match=r'mesh.expert=3 does not divide model.num_experts=8'):
    sharding.check_mesh_fits(c, ModelConfig.from_dict(c.model), sharding.mesh_shape(c.mesh, 3))
