"""The loss contract: per-sequence log-probs against an independent computation, and any loss
(token-averaged or sequence-averaged) exact under gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import config as config_lib
from llmjax import sharding
from llmjax.models import Transformer
from llmjax.models.config import ModelConfig, get_preset
from llmjax.models.transformer import init_params
from llmjax.train import losses
from llmjax.train.loop import make_trainer

CFG = get_preset('tiny', num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=128, vocab_size=48, max_seq_len=64)


def _apply(cfg):
  model = Transformer(cfg)
  return lambda p, x, **kw: model.apply({'params': p}, x, **kw)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize('chunk', [0, 4])
def test_sequence_logprobs_of_a_packed_row_equal_each_sequence_alone(chunk):
  params = init_params(CFG, jax.random.key(0))
  apply_fn = _apply(CFG)
  rng = np.random.default_rng(0)
  a, b = rng.integers(1, 48, 7), rng.integers(1, 48, 5)  # two documents, 6 and 4 targets
  # Row 0 packs a (positions 0..6) and b (0..4) plus 4 padding slots; row 1 holds b alone.
  inputs = np.zeros((2, 16), np.int32)
  targets = np.zeros((2, 16), np.int32)
  seg = np.zeros((2, 16), np.int32)
  pos = np.zeros((2, 16), np.int32)
  mask = np.zeros((2, 16), np.float32)
  inputs[0, :6], targets[0, :6], seg[0, :6], pos[0, :6] = a[:-1], a[1:], 1, np.arange(6)
  inputs[0, 6:10], targets[0, 6:10], seg[0, 6:10], pos[0, 6:10] = b[:-1], b[1:], 2, np.arange(4)
  inputs[1, :4], targets[1, :4], seg[1, :4], pos[1, :4] = b[:-1], b[1:], 1, np.arange(4)
  mask[seg > 0] = 1.0
  mask[0, 0] = 0.0  # a "prompt" token: excluded from its sequence's sum
  batch = {k: jnp.asarray(v) for k, v in dict(inputs=inputs, targets=targets, segment_ids=seg,
                                              positions=pos, loss_mask=mask).items()}
  logps, counts = losses.sequence_logprobs(params, batch, apply_fn, num_segments=2,
                                           loss_chunk=chunk)
  assert logps.shape == (2, 2) and logps.dtype == jnp.float32

  def alone(doc, skip_first=False):  # the document on its own, log-softmax in numpy float64
    logits, _ = jax.jit(apply_fn)(params, jnp.asarray(doc[None, :-1]))
    lp = _log_softmax(logits[0])[np.arange(len(doc) - 1), doc[1:]]
    return lp[1:].sum() if skip_first else lp.sum()

  np.testing.assert_allclose(logps[0, 0], alone(a, skip_first=True), rtol=1e-5)
  np.testing.assert_allclose(logps[0, 1], alone(b), rtol=1e-5)
  np.testing.assert_allclose(logps[1, 0], alone(b), rtol=1e-5)
  np.testing.assert_array_equal(counts, [[5, 4], [4, 0]])
  assert logps[1, 1] == 0.0  # no second sequence in row 1


def _per_sequence_loss(params, batch, apply_fn, loss_chunk=0):
  """A toy sequence-level objective: mean over sequences of -log p(sequence) / 10, with the
  fraction of sequences scoring above -30 nats as a metric (a mean over sequences too)."""
  logps, counts = losses.sequence_logprobs(params, batch, apply_fn, num_segments=2,
                                           loss_chunk=loss_chunk)
  present = (counts > 0).astype(jnp.float32)
  return losses.LossOutput(
      total=jnp.sum(-logps / 10.0 * present), weight=jnp.sum(present),
      metrics={'high': jnp.sum((logps > -30.0) * present),
               'logp_per_token': (jnp.sum(logps), jnp.sum(counts))})


def _config(accum, batch_size=8):
  c = config_lib.base_config('tiny', vocab_size=48, num_layers=2, embed_dim=64, num_heads=4,
                             num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=64)
  c.train.update(dict(steps=10, lr=1e-2, warmup_steps=1, weight_decay=0.1, batch_size=batch_size,
                      grad_accum=accum))
  return c


def _batch(seed):
  """8 rows of 16 positions; rows hold one or two documents and differ in token counts, so
  micro-batches weigh differently (a mean of micro-batch means would be wrong)."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, 48, (8, 16)).astype(np.int32)
  targets = rng.integers(1, 48, (8, 16)).astype(np.int32)
  seg = np.zeros((8, 16), np.int32)
  pos = np.zeros((8, 16), np.int32)
  for r in range(8):
    n1 = 3 + r
    seg[r, :n1], pos[r, :n1] = 1, np.arange(n1)
    if r % 3:
      n2 = min(16, n1 + 2 + r % 4)
      seg[r, n1:n2], pos[r, n1:n2] = 2, np.arange(n2 - n1)
  mask = (seg > 0).astype(np.float32)
  mask[::2, 0] = 0.0
  return {k: jnp.asarray(v) for k, v in dict(inputs=inputs, targets=targets, segment_ids=seg,
                                              positions=pos, loss_mask=mask).items()}


@pytest.mark.parametrize('loss_fn', [losses.next_token_loss, _per_sequence_loss],
                         ids=['next_token', 'per_sequence'])
def test_grad_accum_4_gives_the_grad_accum_1_update(loss_fn):
  runs = []
  for accum in (1, 4):
    c = _config(accum)
    cfg = ModelConfig.from_dict(c.model)
    mesh = sharding.make_mesh(c.mesh)
    tr = make_trainer(c, cfg, mesh, sharding.rules_from_config(c), loss_fn=loss_fn)
    state = tr.init(jax.random.key(0))
    ms = []
    for step in range(2):
      state, m = tr.train_step(state, _batch(step))
      ms.append(jax.device_get(m))
    runs.append((ms, jax.device_get(state.params)))
  (m1, p1), (m4, p4) = runs
  for a, b in zip(m1, m4):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if loss_fn is _per_sequence_loss:  # the metrics are means over their own units
    apply_fn = _apply(ModelConfig.from_dict(_config(1).model))
    out = jax.jit(lambda p, b: loss_fn(p, b, apply_fn))(p1, _batch(0))  # eager: seconds of dispatch
    assert 0.0 <= float(out.metrics['high']) <= float(out.weight)
    assert set(m1[0]) == {'loss', 'weight', 'grad_norm', 'high', 'logp_per_token'}


@pytest.mark.parametrize('chunk', [0, 4])
def test_token_stats_equal_numpy_and_their_logprobs_token_logprobs(chunk):
  """entropy, mean logit and top-1 against float64 numpy on the full logits; the log-probs
  (values and gradients) equal token_logprobs', chunked or not."""
  params = init_params(CFG, jax.random.key(1))
  apply_fn = _apply(CFG)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, CFG.vocab_size, (2, 17)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'segment_ids': np.ones((2, 16), np.int32),
           'positions': np.tile(np.arange(16, dtype=np.int32), (2, 1))}
  # Jitted (one compile each instead of op-by-op dispatch of the forwards and backwards).
  token_stats = jax.jit(lambda p, b: losses.token_stats(p, b, apply_fn, chunk))
  stats = token_stats(params, batch)
  logits, _ = jax.jit(apply_fn)(params, jnp.asarray(batch['inputs']),
                                positions=batch['positions'], segment_ids=batch['segment_ids'])
  logits = np.asarray(logits, np.float64)
  logp = _log_softmax(logits)
  np.testing.assert_allclose(stats['entropy'], -(np.exp(logp) * logp).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(stats['mean_logit'], logits.mean(-1), rtol=1e-5, atol=1e-7)
  targets = batch['targets'].copy()
  targets[1, :8] = logits[1, :8].argmax(-1)  # half of row 1 predicted right
  stats = token_stats(params, dict(batch, targets=targets))
  np.testing.assert_array_equal(stats['is_top1'], logits.argmax(-1) == targets)
  assert stats['is_top1'][1, :8].all()
  want = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(stats['logprobs'], want, rtol=1e-5)
  b = dict(batch, targets=targets)
  g1 = jax.jit(jax.grad(lambda p: jnp.sum(token_stats(p, b)['logprobs'])))(params)
  g0 = jax.jit(jax.grad(lambda p: jnp.sum(losses.token_logprobs(p, b, apply_fn))))(params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), g1, g0)
