"""PPO (llmjax/rl/ppo.py) against hand-computed trajectories and a numpy port of TRL's
PPOTrainer (`compute_rewards`, `loss`, `masked_whiten`; trl/trainer/ppo_trainer.py and
trl/core.py of TRL 0.11), its gradient against the plain policy gradient, and the job end to
end: a value head new on an HF trunk, TRL's metric names, and an export without the head."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import main as main_lib
from llmjax.models import lora
from llmjax.models.config import ModelConfig
from llmjax.models.transformer import Transformer, init_params
from llmjax.rl import grpo, ppo
from llmjax.train import state as state_lib

HF = os.path.join(os.path.dirname(__file__), 'golden', 'llama_gqa_llama3')
RM = os.path.join(os.path.dirname(__file__), 'golden', 'reward')  # TRL-trained score model


def test_gae_equals_a_hand_computed_trajectory():
  """One episode of three tokens, reward 1 at the end: deltas and the lambda-return by hand."""
  r = np.array([[0.0, 0.0, 1.0]])
  v = np.array([[0.5, 0.2, 0.1]])
  adv, ret = ppo.gae(r, v, np.ones((1, 3)), gamma=1.0, lam=0.95)
  # delta = r + V(t+1) - V(t): -0.3, -0.1, 0.9; A(t) = delta(t) + 0.95 A(t+1)
  a2 = 0.9
  a1 = -0.1 + 0.95 * a2
  a0 = -0.3 + 0.95 * a1
  np.testing.assert_allclose(adv, [[a0, a1, a2]], atol=1e-12)
  np.testing.assert_allclose(ret, [[a0 + 0.5, a1 + 0.2, a2 + 0.1]], atol=1e-12)
  # gamma < 1 discounts the bootstrap too; a prompt position before and padding after the
  # completion (mask 0) change nothing in it: the episode ends at its last token.
  r2 = np.array([[9.0, 0.0, 0.0, 1.0, 7.0]])
  v2 = np.array([[3.0, 0.5, 0.2, 0.1, 4.0]])
  m2 = np.array([[0.0, 1.0, 1.0, 1.0, 0.0]])
  adv2, _ = ppo.gae(r2, v2, m2, gamma=0.9, lam=0.5)
  d = [0.0 + 0.9 * 0.2 - 0.5, 0.0 + 0.9 * 0.1 - 0.2, 1.0 - 0.1]
  b2 = d[2]
  b1 = d[1] + 0.45 * b2
  b0 = d[0] + 0.45 * b1
  np.testing.assert_allclose(adv2[0, 1:4], [b0, b1, b2], atol=1e-12)


def test_token_rewards_put_the_score_on_the_last_token_beside_the_kl_penalty():
  old = np.array([[0.0, -1.0, -2.0, -0.5, 0.0]])
  ref = np.array([[0.0, -1.5, -1.0, -0.5, 0.0]])
  mask = np.array([[0, 1, 1, 1, 0]])
  rewards, non_score = ppo.token_rewards(np.array([2.0]), old, ref, mask, beta=0.1)
  np.testing.assert_allclose(non_score, [[0, -0.05, 0.1, 0, 0]], atol=1e-12)
  np.testing.assert_allclose(rewards, [[0, -0.05, 0.1, 2.0, 0]], atol=1e-12)


def _trl_masked_whiten(x, mask):
  """trl/core.py: masked_mean, masked_var(unbiased=True), masked_whiten(shift_mean=True)."""
  mean = (x * mask).sum() / mask.sum()
  var = (((x - mean) ** 2) * mask).sum() / mask.sum()
  var = var * mask.sum() / (mask.sum() - 1)
  return (x - mean) * (1.0 / np.sqrt(var + 1e-8))


def _trl_advantages(scores, old, ref, values, mask, kl_coef, gamma, lam):
  """TRL's compute_rewards + the GAE loop of PPOTrainer.loss, row by row as TRL writes them."""
  n, t = mask.shape
  rewards = np.zeros((n, t))
  for i in range(n):
    rewards[i] = -kl_coef * (old[i] - ref[i])
    rewards[i, np.nonzero(mask[i])[0][-1]] += scores[i]
  values, rewards = values * mask, rewards * mask
  last, rev = 0.0, []
  for j in reversed(range(t)):
    nxt = values[:, j + 1] if j < t - 1 else 0.0
    delta = rewards[:, j] + gamma * nxt - values[:, j]
    last = delta + gamma * lam * last
    rev.append(last)
  adv = np.stack(rev[::-1], axis=1)
  return _trl_masked_whiten(adv, mask), adv + values


def test_rollout_targets_equal_trls_rewards_gae_and_whitening():
  rng = np.random.default_rng(0)
  n, t = 6, 9
  mask = np.zeros((n, t))
  for i, (a, b) in enumerate([(2, 9), (3, 6), (1, 4), (4, 9), (2, 3), (5, 8)]):
    mask[i, a:b] = 1
  old, ref = rng.normal(size=(n, t)), rng.normal(size=(n, t))
  values, scores = rng.normal(size=(n, t)), rng.normal(size=n)
  cfg = grpo.RLConfig(beta=0.05, gamma=0.97, lam=0.9)
  cols, metrics = ppo.rollout_targets(scores, old, values, mask, cfg, ref_logps=ref)
  want_adv, want_ret = _trl_advantages(scores, old, ref, values, mask, 0.05, 0.97, 0.9)
  np.testing.assert_allclose(cols['advantages'], want_adv * mask, atol=1e-5)
  np.testing.assert_allclose(cols['returns'], want_ret * mask, atol=1e-5)
  kl = ((old - ref) * mask).sum(1)
  assert metrics['objective/kl'] == pytest.approx(kl.mean())
  assert metrics['objective/rlhf_reward'] == pytest.approx(np.mean(scores - 0.05 * kl))


CFG = ModelConfig(vocab_size=61, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                  head_dim=0, mlp_dim=64, max_seq_len=32, value_head=True)


def _batch(rng, b=4, t=12):
  inputs = rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
  targets = np.roll(inputs, -1, axis=1)
  mask = np.zeros((b, t), np.float32)
  for i in range(b):
    mask[i, 3 + i:t - i] = 1
  return {'inputs': inputs, 'targets': targets,
          'positions': np.tile(np.arange(t, dtype=np.int32), (b, 1)),
          'segment_ids': np.ones((b, t), np.int32), 'completion_mask': mask,
          'advantages': rng.normal(size=(b, t)).astype(np.float32),
          'returns': rng.normal(size=(b, t)).astype(np.float32),
          'old_values': rng.normal(scale=0.1, size=(b, t)).astype(np.float32)}


def _apply(p, x, **kw):
  return Transformer(CFG).apply({'params': p}, x, **kw)


def test_loss_equals_trls_clipped_policy_and_value_losses():
  rng = np.random.default_rng(1)
  params = init_params(CFG, jax.random.key(0))
  batch = _batch(rng)
  logits, _ = _apply(params, batch['inputs'])
  hidden, _ = _apply(params, batch['inputs'], return_hidden=True)
  vpred = np.asarray(_apply(params, hidden, method=Transformer.values), np.float64)
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  logp = np.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0] - logz
  batch['old_logps'] = (logp + rng.normal(scale=0.3, size=logp.shape)).astype(np.float32)
  cfg = grpo.RLConfig(epsilon_low=0.2, epsilon_high=0.2, vf_coef=0.1, cliprange_value=0.2)
  # TRL's PPOTrainer.loss with the batch's advantages (already whitened there) and returns.
  m, adv, ret, val = (batch[k].astype(np.float64) for k in
                      ('completion_mask', 'advantages', 'returns', 'old_values'))
  mean = lambda x: (x * m).sum() / m.sum()
  ratio = np.exp(logp - batch['old_logps'])
  pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)
  vclip = np.clip(vpred, val - 0.2, val + 0.2)
  vf1, vf2 = (vpred - ret) ** 2, (vclip - ret) ** 2
  pg_loss, vf_loss = mean(np.maximum(pg1, pg2)), 0.5 * mean(np.maximum(vf1, vf2))
  for chunk in (0, 4):
    out = jax.jit(lambda p, b: ppo.make_loss_fn(cfg)(p, b, _apply, loss_chunk=chunk))(params,
                                                                                      batch)
    assert float(out.total / out.weight) == pytest.approx(pg_loss + 0.1 * vf_loss, abs=1e-5)
    got = {k: float(s / c) for k, (s, c) in out.metrics.items()}
    assert got['loss/policy_avg'] == pytest.approx(pg_loss, abs=1e-5)
    assert got['loss/value_avg'] == pytest.approx(vf_loss, abs=1e-5)
    assert got['policy/clipfrac_avg'] == pytest.approx(mean(pg2 > pg1), abs=1e-6)
    assert got['val/clipfrac_avg'] == pytest.approx(mean(vf2 > vf1), abs=1e-6)
    assert 0 < got['policy/clipfrac_avg'] < 1 and 0 < got['val/clipfrac_avg'] < 1
    assert got['policy/approxkl_avg'] == pytest.approx(
        mean(0.5 * (logp - batch['old_logps']) ** 2), abs=1e-5)


def test_one_update_without_the_value_loss_is_the_policy_gradient():
  """old_logp = logp (the first update of a rollout batch): the clipped ratio is 1, and with
  vf_coef = 0 the gradient is that of -mean_t A(t) logp(t)."""
  rng = np.random.default_rng(2)
  params = init_params(CFG, jax.random.key(1))
  batch = _batch(rng)
  cfg = grpo.RLConfig(vf_coef=0.0)
  rollout = jax.jit(ppo.make_rollout_fn(cfg, _apply))(params, batch)
  batch['old_logps'] = np.asarray(rollout['logps'])
  loss = lambda p: (lambda o: o.total / o.weight)(ppo.make_loss_fn(cfg)(p, batch, _apply))

  def pg(p):
    lp = ppo.make_rollout_fn(cfg, _apply)(p, batch)['logps']
    m = batch['completion_mask']
    return -jnp.sum(batch['advantages'] * lp * m) / jnp.sum(m)

  got, want = jax.grad(loss)(params), jax.grad(pg)(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)
  assert float(jnp.abs(got['value_head']['kernel']).max()) == 0.0  # no value loss, no grad


def test_value_head_is_new_on_a_source_trained_under_lora_and_dropped_by_merge():
  params = init_params(CFG, jax.random.key(0))
  assert params['value_head']['kernel'].shape == (32, 1) and 'bias' in params['value_head']
  lora_cfg = ModelConfig(**{**CFG.__dict__, 'lora_rank': 2})
  mask = state_lib.trainable_mask(lora_cfg, init_params(lora_cfg, jax.random.key(0)))
  assert mask['value_head'] == {'kernel': True, 'bias': True}
  assert mask['embed']['embedding'] is False
  merged, cfg = lora.merge(params, CFG)
  assert 'value_head' not in merged and not cfg.value_head


REWARDS = '''
def count_o(prompts, completions, **columns):
    return [c.count('o') / max(len(c), 1) for c in completions]
'''


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp('ppo')
  (d / 'ppo_test_rewards.py').write_text(REWARDS)
  with open(d / 'prompts.jsonl', 'w') as f:
    for p in ['the quick', 'hello world', 'the lazy dog', 'brown fox', 'hello', 'the', 'over',
              'jumps']:
      f.write(json.dumps({'prompt': p}) + '\n')
  sys.path.insert(0, str(d))
  yield d
  sys.path.remove(str(d))


def _args(workdir, data, *extra):
  return ['--config=experiments/ppo.py:batch=8,epochs=2,steps=4', f'--workdir={workdir}',
          f'--config.init.hf_dir={HF}', f"--config.data.path={data / 'prompts.jsonl'}",
          f'--config.rl.reward_fns=ppo_test_rewards:count_o,{RM}',
          '--config.rl.max_completion_length=8',
          '--config.data.seq_len=32', '--config.model.dtype=float32', '--config.train.lr=1e-3',
          '--config.train.log_every=1', *extra]


def test_a_ppo_run_from_an_hf_trunk_logs_trls_names_and_exports_without_its_head(
    tmp_path, data):
  from llmjax import convert
  from llmjax.interop.safetensors_io import Reader
  assert main_lib.main(_args(tmp_path / 'w', data)) == 0
  rows = [json.loads(line) for line in open(tmp_path / 'w' / 'metrics.jsonl')]
  last = rows[-1]
  for name in ('loss/policy_avg', 'loss/value_avg', 'policy/clipfrac_avg', 'val/clipfrac_avg',
               'policy/approxkl_avg', 'policy/entropy_avg', 'objective/kl', 'objective/scores',
               'objective/non_score_reward', 'objective/rlhf_reward', 'reward', 'kl',
               'rewards/ppo_test_rewards.count_o/mean', 'rewards/reward/mean',
               'completions/clipped_ratio'):
    assert np.isfinite(last[name]), name
  # The first update of each rollout batch: whitened advantages average 0 and the ratio is 1,
  # so the policy loss is 0 up to rounding.
  assert abs(rows[0]['loss/policy_avg']) < 1e-5
  assert convert.main(['--to=hf', f"--src={tmp_path / 'w'}", f"--dst={tmp_path / 'hf'}"]) == 0
  ours = set(Reader(str(tmp_path / 'hf')).shapes)
  assert ours == set(Reader(HF).shapes)  # the exported LM has the source's tensors, no more


def test_a_reward_model_dir_is_a_reward_function_equal_to_transformers_scores():
  """rl.reward_fns may name a reward model's dir (TRL takes a model id): each prompt +
  completion scored as transformers scored its TRL tokenization (tests/golden/reward)."""
  from llmjax.data.preference import PreferenceTokenizer
  from llmjax.errors import ConfigError
  from llmjax.interop import load_hf
  from llmjax.rl import rewards
  golden = json.load(open(os.path.join(RM, 'golden.json')))['runs']['plain']
  rows = [tuple(i for i, m in zip(ids, am) if m)
          for ids, am in zip(golden['input_ids'], golden['attention_mask'])]
  tok = PreferenceTokenizer(load_hf(RM)[2])
  prompts, completions, want = [], [], []
  for line in open(os.path.join(RM, 'pairs.jsonl')):
    rec = json.loads(line)
    for c in (rec['chosen'], rec['rejected']):
      ids = tuple(tok.plain_with_eos(rec['prompt'], c))
      if ids in rows:  # TRL's rows, as its tokenizer made them
        prompts.append(rec['prompt'])
        completions.append(c)
        want.append(golden['rewards'][rows.index(ids)])
  assert len(want) == 16
  (name, fn), = rewards.load([RM])[0]
  assert name == 'reward'
  np.testing.assert_allclose(fn(prompts, completions), want, atol=1e-5)
  with pytest.raises(ConfigError, match='is a language model'):
    rewards.load([HF])


def test_ppo_without_a_value_head_is_a_config_error(tmp_path, data, capsys):
  assert main_lib.main(_args(tmp_path / 'w', data, '--config.model.value_head=False')) == 2
  assert 'model.value_head=True' in capsys.readouterr().err
