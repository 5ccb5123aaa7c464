"""Train-step tests: a hand-computed loss, memorisation, gradient accumulation, the sampler."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import config as config_lib
from llmjax import sharding
from llmjax.infer import sampler
from llmjax.models import Transformer
from llmjax.models.config import ModelConfig
from llmjax.train import losses
from llmjax.train.loop import make_trainer


def test_cross_entropy_hand_computed():
  logits = jnp.array([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # p(1) = 3/4 ; p = 1/2
  targets = jnp.array([[1, 0]])
  loss_sum, w = losses.cross_entropy(logits, targets, jnp.array([[1.0, 1.0]]))
  np.testing.assert_allclose(loss_sum, -math.log(0.75) - math.log(0.5), rtol=1e-6)
  assert w == 2.0
  loss_sum, w = losses.cross_entropy(logits, targets, jnp.array([[0.0, 1.0]]))
  np.testing.assert_allclose(loss_sum, math.log(2.0), rtol=1e-6)


def small_config(**train):
  c = config_lib.base_config('tiny', vocab_size=32, num_layers=2, embed_dim=64, num_heads=4,
                             num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=64)
  c.train.update(dict(steps=200, lr=3e-3, warmup_steps=10, weight_decay=0.0, batch_size=4))
  c.train.update(train)
  return c


def trainer_for(c):
  cfg = ModelConfig.from_dict(c.model)
  mesh = sharding.make_mesh(c.mesh)
  return cfg, make_trainer(c, cfg, mesh, sharding.rules_from_config(c))


def batch_of(rows: np.ndarray) -> dict:
  b, t1 = rows.shape
  return {'inputs': jnp.asarray(rows[:, :-1], jnp.int32), 'targets': jnp.asarray(rows[:, 1:], jnp.int32),
          'segment_ids': jnp.ones((b, t1 - 1), jnp.int32),
          'positions': jnp.broadcast_to(jnp.arange(t1 - 1, dtype=jnp.int32), (b, t1 - 1)),
          'loss_mask': jnp.ones((b, t1 - 1), jnp.float32)}


def test_tiny_model_memorises_a_repeated_sequence():
  c = small_config(steps=150)
  _, tr = trainer_for(c)
  seq = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3] * 2)
  batch = batch_of(np.stack([seq] * 4))
  state = tr.init(jax.random.key(0))
  for _ in range(150):
    state, m = tr.train_step(state, batch)
  assert float(m['loss']) < 0.05, float(m['loss'])


def test_gradient_accumulation_equals_one_big_batch():
  rng = np.random.default_rng(0)
  rows = rng.integers(0, 32, (4, 17))
  batch = batch_of(rows)
  batch['loss_mask'] = batch['loss_mask'].at[0, :9].set(0.0)  # unequal token counts per micro-batch
  results = []
  for accum in (1, 2):
    _, tr = trainer_for(small_config(grad_accum=accum))
    state = tr.init(jax.random.key(0))
    for _ in range(3):
      state, m = tr.train_step(state, batch)
    results.append((float(m['loss']), state.params))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def _model():
  c = small_config()
  cfg = ModelConfig.from_dict(c.model)
  from llmjax.models import init_params
  return cfg, init_params(cfg, jax.random.key(3))


def test_greedy_sampling_equals_argmax_of_full_forward():
  cfg, params = _model()
  prompts = [[1, 5, 7, 2, 9], [4, 4]]
  outs = sampler.generate(cfg, params, prompts, sampler.SamplingParams(max_new_tokens=6, temperature=0),
                          eos_id=-1)
  # One full forward (no cache) over prompt + generated tokens: in a causal model, position i's
  # logits are those of a forward over the first i + 1 tokens alone, so the argmax at each
  # prompt-end and generated position must be the next generated token. (Decoding leaks no
  # future tokens, so a forward that did would disagree here too.)
  forward = jax.jit(lambda p, x: Transformer(cfg).apply({'params': p}, x)[0])
  for prompt, out in zip(prompts, outs):
    assert len(out) == 6
    logits = forward(params, jnp.array([prompt + out]))  # [1, len(prompt) + 6, vocab]
    want = jnp.argmax(logits[0, len(prompt) - 1:-1], axis=-1)
    assert out == [int(t) for t in want]


def test_top_k_1_is_greedy_and_eos_stops():
  cfg, params = _model()
  prompts = [[1, 2, 3]]
  greedy = sampler.generate(cfg, params, prompts, sampler.SamplingParams(8, temperature=0), eos_id=-1)
  topk1 = sampler.generate(cfg, params, prompts, sampler.SamplingParams(8, temperature=1.0, top_k=1),
                           eos_id=-1, seed=5)
  assert greedy == topk1
  eos = greedy[0][2]
  stopped = sampler.generate(cfg, params, prompts, sampler.SamplingParams(8, temperature=0), eos_id=eos)
  assert stopped[0] == greedy[0][:greedy[0].index(eos)]


def test_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  p = sampler.SamplingParams(temperature=1.0, top_p=0.7)
  draw = jax.jit(lambda key: sampler.sample_logits(logits, key, p))  # one compile, 200 draws
  draws = {int(draw(jax.random.key(i))[0]) for i in range(200)}
  assert draws == {0, 1}


def test_prompt_longer_than_context_is_a_clear_error():
  cfg, params = _model()
  with pytest.raises(Exception, match='exceeds the model context 64'):
    sampler.generate(cfg, params, [[1] * 60], sampler.SamplingParams(max_new_tokens=10), eos_id=-1)


@pytest.mark.parametrize('tie', [False, True])
def test_chunked_loss_equals_whole_logits_loss_and_gradients(tie):
  c = small_config()
  c.model.tie_embeddings = tie
  cfg = ModelConfig.from_dict(c.model)
  model = Transformer(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  import flax.linen as nn
  params = nn.meta.unbox(params)
  rows = np.asarray(jax.random.randint(jax.random.key(1), (2, 33), 0, 32))
  batch = batch_of(rows)
  batch['loss_mask'] = batch['loss_mask'].at[0, :5].set(0.0)  # some masked targets
  apply_fn = lambda p, x, **kw: model.apply({'params': p}, x, **kw)
  # Jitted, as in the train step (op by op, each backward spends seconds compiling primitives).
  whole = jax.jit(jax.value_and_grad(lambda p: losses.next_token_loss(p, batch, apply_fn).total))
  chunked = jax.jit(jax.value_and_grad(
      lambda p: losses.next_token_loss(p, batch, apply_fn, loss_chunk=8).total))
  (lw, gw), (lc, gc) = whole(params), chunked(params)
  np.testing.assert_allclose(lc, lw, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), gc, gw)


def test_loss_chunk_must_divide_the_sequence():
  c = small_config()
  c.data.seq_len = 32
  c.train.loss_chunk = 12
  with pytest.raises(config_lib.ConfigError, match='train.loss_chunk=12 must be 0'):
    config_lib.validate(c)


def test_train_steps_with_loss_chunk_equal_whole_logits_steps():
  # Through make_trainer: the jitted step (and eval step) use the chunked path end to end.
  rows = np.asarray(jax.random.randint(jax.random.key(2), (4, 33), 0, 32))
  batch = batch_of(rows)
  runs = []
  for chunk in (0, 8):
    c = small_config(steps=3)
    c.data.seq_len = 32
    c.train.loss_chunk = chunk
    _, tr = trainer_for(c)
    state = tr.init(jax.random.key(0))
    losses_ = []
    for _ in range(3):
      state, m = tr.train_step(state, batch)
      losses_.append(float(m['loss']))
    losses_.append(float(tr.eval_step(state.params, batch).total))
    runs.append(losses_)
  np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)
