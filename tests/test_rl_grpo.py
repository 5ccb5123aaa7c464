"""GRPO's advantages and loss (llmjax/rl/grpo.py) against TRL 1.16's formulas written out here
in numpy, line for line from trl/trainer/grpo_trainer.py (`_generate_and_score_completions`
for the advantages, `_compute_loss` for the loss and its metrics), and hand-computed cases.

The loss is driven through a stand-in model whose "params" are the logits themselves, so the
log-probs, ratios and KL are known exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.errors import ConfigError
from llmjax.rl import grpo
from llmjax.train import losses


def _cfg(**kw):
  return grpo.RLConfig(**{'num_generations': 2, 'max_completion_length': 5, **kw})


# ------------------------------------------------------------------------------ advantages


def trl_advantages(rewards_per_func, weights, g, scale):
  """TRL's sum_then_normalize branch: nanstd is Bessel-corrected; + 1e-4 in the division."""
  rewards = (rewards_per_func * weights[None]).sum(1)
  mean = np.repeat(rewards.reshape(-1, g).mean(1), g)
  if scale in ('group', 'none'):
    std = np.repeat(rewards.reshape(-1, g).std(1, ddof=1), g)
  else:
    std = np.full_like(rewards, rewards.std(ddof=1))
  adv = rewards - mean
  if scale != 'none':
    adv = adv / (std + 1e-4)
  return adv, np.isclose(std, 0).mean()


@pytest.mark.parametrize('scale', ['group', 'batch', 'none'])
def test_advantages_are_trls(scale):
  rng = np.random.default_rng(0)
  per_func = rng.normal(size=(12, 2))
  per_func[4:8] = 1.0  # one group with equal rewards: std 0
  weights = np.array([1.0, 0.5])
  got, m = grpo.advantages(per_func, weights, 4, scale)
  want, zero = trl_advantages(per_func, weights, 4, scale)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert m['frac_reward_zero_std'] == pytest.approx(zero)
  assert m['reward'] == pytest.approx((per_func @ weights).mean())


def test_advantages_by_hand():
  # Group [1, 0, 0, 1]: mean 0.5, Bessel std sqrt(1/3); group [2, 2]: all equal, advantage 0.
  adv, m = grpo.advantages(np.array([[1.], [0.], [0.], [1.]]), np.array([1.0]), 4, 'group')
  np.testing.assert_allclose(adv, np.array([.5, -.5, -.5, .5]) / (np.sqrt(1 / 3) + 1e-4))
  adv, m = grpo.advantages(np.array([[2.], [2.]]), np.array([1.0]), 2, 'group')
  np.testing.assert_array_equal(adv, [0.0, 0.0])
  assert m['frac_reward_zero_std'] == 1.0


# ------------------------------------------------------------------------------ the loss


def _batch(rng, b=4, t=6, v=5):
  """A batch whose completion masks differ in length (one row all prompt: no tokens)."""
  mask = np.zeros((b, t), np.float32)
  for i, (start, end) in enumerate([(1, 6), (2, 4), (0, 3), (3, 6)][:b]):
    mask[i, start:end] = 1
  return {
      'inputs': np.zeros((b, t), np.int32), 'positions': np.zeros((b, t), np.int32),
      'segment_ids': np.ones((b, t), np.int32),
      'targets': rng.integers(0, v, (b, t)).astype(np.int32),
      'completion_mask': mask,
      'advantages': rng.normal(size=(b, 1)).astype(np.float32),
      'old_logps': np.zeros((b, t), np.float32), 'sampler_logps': np.zeros((b, t), np.float32),
  }


def _apply(params, inputs, positions=None, segment_ids=None, **_):
  return params['logits'], None


def _logp(logits, targets, temperature=1.0):
  z = logits / temperature
  z = z - z.max(-1, keepdims=True)
  lse = np.log(np.exp(z).sum(-1))
  return np.take_along_axis(z, targets[..., None], -1)[..., 0] - lse


def trl_loss(cfg, logp, old, ref, adv, mask):
  """TRL's _compute_loss for loss types grpo/bnpo/dr_grpo/dapo on one (global) batch."""
  log_ratio = logp - old
  if cfg.importance_sampling_level == 'token':
    log_w = log_ratio
  else:
    log_w = ((log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0))[:, None]
  coef_1 = np.exp(log_w)
  coef_2 = np.clip(coef_1, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
  per_token = -np.minimum(coef_1 * adv, coef_2 * adv)
  per_token = np.broadcast_to(per_token, logp.shape)
  if cfg.beta:
    kl = np.exp(ref - logp) - (ref - logp) - 1
    per_token = per_token + cfg.beta * kl
  if cfg.loss_type == 'grpo':
    rows = mask.sum(-1) > 0  # rows with no completion token are padding here
    return ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0))[rows].mean()
  if cfg.loss_type == 'dr_grpo':
    return (per_token * mask).sum() / ((mask.sum(-1) > 0).sum() * cfg.max_completion_length)
  return (per_token * mask).sum() / np.maximum(mask.sum(), 1.0)  # bnpo; dapo globally


@pytest.mark.parametrize('loss_type', grpo.LOSS_TYPES)
@pytest.mark.parametrize('level', grpo.IS_LEVELS)
@pytest.mark.parametrize('beta', [0.0, 0.04])
def test_loss_is_trls(loss_type, level, beta):
  rng = np.random.default_rng(1)
  cfg = _cfg(loss_type=loss_type, importance_sampling_level=level, beta=beta, num_iterations=2,
             epsilon_low=0.2, epsilon_high=0.28, temperature=0.7)
  batch = _batch(rng)
  logits = rng.normal(size=(4, 6, 5)).astype(np.float32)
  ref_logits = logits + rng.normal(size=logits.shape).astype(np.float32) * 0.3
  logp = _logp(logits, batch['targets'], 0.7)
  # Old log-probs a little off, some far enough to clip on either side.
  batch['old_logps'] = (logp + rng.normal(size=logp.shape) * 0.3).astype(np.float32)
  out = grpo.make_loss_fn(cfg)({'logits': jnp.asarray(logits)}, batch, _apply,
                               ref_params={'logits': jnp.asarray(ref_logits)})
  want = trl_loss(cfg, logp, batch['old_logps'], _logp(ref_logits, batch['targets'], 0.7),
                  batch['advantages'], batch['completion_mask'])
  got = float(out.total / out.weight)
  assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
  metrics = {k: float(v) for k, v in losses.reduce_output(out).items()}
  assert set(metrics) >= {'entropy', 'clip_ratio/low_mean', 'clip_ratio/high_mean',
                          'clip_ratio/region_mean'} | ({'kl'} if beta else set())


def test_metrics_by_hand():
  """Two tokens: one whose ratio is below 1 - eps with A < 0 (low-clipped), one above
  1 + eps_high with A > 0 (high-clipped); the k3 KL of ref = logp is 0."""
  cfg = _cfg(num_iterations=2, epsilon_low=0.2, epsilon_high=0.28, beta=0.1)
  logits = np.zeros((2, 1, 2), np.float32)  # logp = log 1/2 for either target
  lp = float(np.log(0.5))
  batch = {
      'inputs': np.zeros((2, 1), np.int32), 'positions': np.zeros((2, 1), np.int32),
      'segment_ids': np.ones((2, 1), np.int32), 'targets': np.zeros((2, 1), np.int32),
      'completion_mask': np.ones((2, 1), np.float32),
      'advantages': np.array([[-1.0], [2.0]], np.float32),
      # ratio 0.5 (< 0.8) on row 0, 2.0 (> 1.28) on row 1
      'old_logps': np.array([[lp - np.log(0.5)], [lp - np.log(2.0)]], np.float32),
      'sampler_logps': np.zeros((2, 1), np.float32)}
  out = grpo.make_loss_fn(cfg)({'logits': jnp.asarray(logits)}, batch, _apply,
                               ref_params={'logits': jnp.asarray(logits)})
  m = {k: float(v) for k, v in losses.reduce_output(out).items()}
  assert m['clip_ratio/low_mean'] == 0.5 and m['clip_ratio/high_mean'] == 0.5
  assert m['clip_ratio/region_mean'] == 1.0
  assert m['kl'] == pytest.approx(0.0, abs=1e-7)
  assert m['entropy'] == pytest.approx(np.log(2.0), rel=1e-6)
  # Row 0: -min(0.5 * -1, 0.8 * -1) = 0.8; row 1: -min(2 * 2, 1.28 * 2) = -2.56; mean -0.88.
  assert m['loss'] == pytest.approx((0.8 - 2.56) / 2, rel=1e-6)


def test_one_update_per_batch_is_the_policy_gradient():
  """num_iterations = 1: the ratio is exp(logp - stop_gradient(logp)) = 1, so the loss's
  gradient is that of -sum(A * logp * mask) / weight."""
  rng = np.random.default_rng(2)
  cfg = _cfg(num_iterations=1, loss_type='bnpo')
  batch = _batch(rng)
  logits = jnp.asarray(rng.normal(size=(4, 6, 5)).astype(np.float32))
  loss = grpo.make_loss_fn(cfg)
  g = jax.grad(lambda x: (lambda o: o.total / o.weight)(loss({'logits': x}, batch, _apply)))(logits)

  def pg(x):
    lp = losses.target_logprobs(x, jnp.asarray(batch['targets']))
    m = jnp.asarray(batch['completion_mask'])
    return -jnp.sum(jnp.asarray(batch['advantages']) * lp * m) / m.sum()
  np.testing.assert_allclose(g, jax.grad(pg)(logits), rtol=1e-5, atol=1e-7)
  out = loss({'logits': logits}, batch, _apply)
  assert float(losses.reduce_output(out)['clip_ratio/region_mean']) == 0.0


def test_sampler_correction_weights_each_token():
  """rl.sampler_is='token': each token's loss times min(exp(old - sampler), cap); an EOS with
  no sampler log-prob (NaN) keeps weight 1."""
  rng = np.random.default_rng(3)
  cfg = _cfg(num_iterations=1, sampler_is='token', sampler_is_cap=3.0, loss_type='bnpo')
  batch = _batch(rng)
  logits = rng.normal(size=(4, 6, 5)).astype(np.float32)
  logp = _logp(logits, batch['targets'])
  batch['old_logps'] = logp.astype(np.float32)
  sampler = logp + rng.normal(size=logp.shape) * 0.8
  sampler[0, 5] = np.nan
  batch['sampler_logps'] = sampler.astype(np.float32)
  out = grpo.make_loss_fn(cfg)({'logits': jnp.asarray(logits)}, batch, _apply)
  w = np.minimum(np.exp(np.where(np.isnan(sampler), 0.0, logp - sampler)), 3.0)
  mask = batch['completion_mask']
  want = (-batch['advantages'] * w * mask).sum() / mask.sum()
  assert float(out.total / out.weight) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize('key, value, match', [
    ('loss_type', 'ppo', "rl.loss_type='ppo' is not one of"),
    ('scale_rewards', 'groups', "Did you mean 'group'"),
    ('importance_sampling_level', 'seq', 'rl.importance_sampling_level'),
    ('num_generations', 1, 'a group of one has no spread'),
    ('temperature', 0.0, 'must be > 0'),
    ('top_p', 1.5, r'rl.top_p=1.5 must be in \(0, 1\]'),
])
def test_bad_rl_settings_are_one_line_errors(key, value, match):
  from llmjax import config as config_lib
  rl = config_lib.base_config().rl
  rl[key] = value
  with pytest.raises(ConfigError, match=match):
    grpo.RLConfig.from_config(rl)


# ------------------------------------------------------------------------------ RLOO


def trl_rloo_advantages(rewards_per_func, weights, g, kl, beta, normalize):
  """TRL 1.16 RLOOTrainer._generate_and_score_completions, every reward scorable."""
  rewards = (rewards_per_func * weights[None]).sum(1) - beta * kl
  grouped = rewards.reshape(-1, g)
  baselines = ((grouped.sum(1, keepdims=True) - grouped) / (g - 1)).reshape(-1)
  adv = rewards - baselines
  if normalize:
    adv = (adv - adv.mean()) / (adv.std(ddof=1) + 1e-4)
  return adv


@pytest.mark.parametrize('normalize', [False, True])
@pytest.mark.parametrize('beta', [0.0, 0.05])
def test_rloo_advantages_are_trls(normalize, beta):
  from llmjax.rl import rloo
  rng = np.random.default_rng(4)
  per_func, kl = rng.normal(size=(12, 2)), rng.normal(size=12)
  weights = np.array([1.0, 0.3])
  got, m = rloo.advantages(per_func, weights, 4, kl=kl, beta=beta, normalize=normalize)
  np.testing.assert_allclose(got, trl_rloo_advantages(per_func, weights, 4, kl, beta, normalize),
                             rtol=1e-12)
  assert m['reward'] == pytest.approx((per_func @ weights - beta * kl).mean())


def test_rloo_baseline_leaves_the_sample_out():
  """Group [1, 0, 0]: baselines (0+0)/2, (1+0)/2, (1+0)/2 -> advantages 1, -0.5, -0.5."""
  from llmjax.rl import rloo
  adv, _ = rloo.advantages(np.array([[1.], [0.], [0.]]), np.array([1.0]), 3)
  np.testing.assert_allclose(adv, [1.0, -0.5, -0.5])


def test_rloo_loss_is_trls_sequence_level_clipped_ratio():
  from llmjax.rl import rloo
  rng = np.random.default_rng(5)
  cfg = _cfg(epsilon_low=0.2, epsilon_high=0.28, temperature=0.9)
  batch = _batch(rng)
  logits = rng.normal(size=(4, 6, 5)).astype(np.float32)
  logp = _logp(logits, batch['targets'], 0.9)
  batch['old_logps'] = (logp + rng.normal(size=logp.shape) * 0.2).astype(np.float32)
  out = rloo.make_loss_fn(cfg)({'logits': jnp.asarray(logits)}, batch, _apply)
  mask = batch['completion_mask']
  ratio = np.exp((logp * mask).sum(-1) - (batch['old_logps'] * mask).sum(-1))
  adv = batch['advantages'][:, 0]
  per_seq = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.28) * adv)
  rows = mask.sum(-1) > 0
  assert float(out.total / out.weight) == pytest.approx(per_seq[rows].mean(), rel=1e-5)
  m = {k: float(v) for k, v in losses.reduce_output(out).items()}
  low = ((ratio < 0.8) & (adv < 0))[rows].mean()
  assert m['clip_ratio/low_mean'] == pytest.approx(low)
