"""PPO (train.objective='ppo'): per-token rewards with a KL penalty, GAE advantages from a value
head on the policy trunk, and the clipped policy and value losses, as TRL's PPOTrainer defines
them with `AutoModelForCausalLMWithValueHead` (trl/trainer/ppo_trainer.py of TRL 0.11:
`compute_rewards`, `loss`; TRL 1.16 has no PPO trainer left), through the one train step and
the RL loop of GRPO (`llmjax.rl.loop`; settings in config.rl, `grpo.RLConfig`).

At rollout time (`rollout_targets`), per completion token t of completion i (the EOS included,
as GRPO's completion_mask), with old_logp and the values V the policy's before any update:
    score_i  = sum_j w_j reward_j(i)                      (rl.reward_fns, weighted)
    r(i, t)  = -beta * (old_logp(t) - ref_logp(t))        (`compute_rewards`: the k1 estimate)
             + score_i at i's last completion token
    delta(t) = r(t) + gamma * V(t + 1) - V(t)             (V = 0 past the last token)
    A(t)     = delta(t) + gamma * lam * A(t + 1)          (GAE, Schulman et al. 2016)
    R(t)     = A(t) + V(t)                                (the value target)
    A        = (A - mean) / sqrt(var + 1e-8) over the batch's completion tokens
               (`masked_whiten`, Bessel's var; rl.whiten_advantages)
rl.beta is TRL's kl coefficient (fixed: TRL's adaptive controller is not implemented), gamma
and lam are rl.gamma and rl.lam. TRL whitens per mini-batch; here the rollout batch is the
mini-batch of each of the rl.num_iterations updates (TRL's ppo_epochs), so the whole batch.

Loss (`loss`), per completion token, with V' and logp the current model's:
    ratio  = exp(logp - old_logp)
    pg     = max(-A * ratio, -A * clip(ratio, 1 - epsilon_low, 1 + epsilon_high))
    V'clip = clip(V', V - cliprange_value, V + cliprange_value)
    vf     = 0.5 * max((V' - R)^2, (V'clip - R)^2)
    loss   = mean_t pg + rl.vf_coef * mean_t vf          (token means over the global batch)
The value head reads the trunk's final-norm output, so the value loss trains the trunk too, as
TRL's shared-trunk model does. Metrics, TRL's PPO names: loss/policy_avg, loss/value_avg,
policy/clipfrac_avg, val/clipfrac_avg, policy/approxkl_avg (0.5 (logp - old_logp)^2),
policy/entropy_avg and entropy; the loop logs objective/scores, objective/kl (summed per
completion), objective/non_score_reward, objective/rlhf_reward with the GRPO reward metrics.
"""

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.models.transformer import Transformer
from llmjax.rl import grpo
from llmjax.train import losses


def token_rewards(scores: np.ndarray, old_logps: np.ndarray, ref_logps: np.ndarray | None,
                  mask: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
  """TRL's `compute_rewards`: scores [N], log-probs and mask [N, T] -> (rewards [N, T], the
  KL part of them non_score [N, T]), zero outside the mask; each score at its row's last
  completion token."""
  mask = mask.astype(np.float64)
  kl = (old_logps - ref_logps) * mask if ref_logps is not None else np.zeros_like(mask)
  non_score = -beta * kl
  rewards = non_score.copy()
  t = mask.shape[1]
  last = t - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)  # [N] index of each row's last 1
  has = mask.any(axis=1)
  rewards[np.arange(len(scores))[has], last[has]] += np.asarray(scores, np.float64)[has]
  return rewards, non_score


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float,
        lam: float) -> tuple[np.ndarray, np.ndarray]:
  """Generalised advantage estimation as TRL's `loss`: rewards, values, mask [N, T] ->
  (advantages, returns) [N, T]. Values and rewards outside the mask are zero, so a row's
  bootstrap past its last completion token is 0 (the episode ends there)."""
  values = values * mask
  rewards = rewards * mask
  n, t = rewards.shape
  adv = np.zeros((n, t), np.float64)
  last = np.zeros(n, np.float64)
  for j in reversed(range(t)):
    nxt = values[:, j + 1] if j < t - 1 else 0.0
    delta = rewards[:, j] + gamma * nxt - values[:, j]
    last = delta + gamma * lam * last
    adv[:, j] = last
  return adv, adv + values


def whiten(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """TRL's `masked_whiten` (shift_mean=True): (x - mean) / sqrt(var + 1e-8) with the masked
  mean and the Bessel-corrected masked variance."""
  m = mask.astype(np.float64)
  n = m.sum()
  if n < 2:
    return x - (x * m).sum() / max(n, 1.0)
  mean = (x * m).sum() / n
  var = (((x - mean) ** 2) * m).sum() / n * (n / (n - 1))
  return (x - mean) / np.sqrt(var + 1e-8)


def rollout_targets(scores: np.ndarray, old_logps: np.ndarray, values: np.ndarray,
                    mask: np.ndarray, cfg: grpo.RLConfig,
                    ref_logps: np.ndarray | None = None) -> tuple[dict, dict]:
  """The PPO columns of a rollout batch and its objective/* metrics.

  Returns ({advantages, returns, old_values: [N, T] float32}, metrics)."""
  rewards, non_score = token_rewards(scores, old_logps, ref_logps, mask, cfg.beta)
  adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
  if cfg.whiten_advantages:
    adv = whiten(adv, mask)
  m = mask.astype(np.float64)
  kl = ((old_logps - ref_logps) * m).sum(1) if ref_logps is not None else np.zeros(len(scores))
  non_score_sum = non_score.sum(1)
  metrics = {'objective/scores': float(np.mean(scores)),
             'objective/kl': float(kl.mean()),
             'objective/non_score_reward': float(non_score_sum.mean()),
             'objective/rlhf_reward': float(np.mean(scores + non_score_sum))}
  if ref_logps is not None:
    metrics['kl'] = float(kl.sum() / max(m.sum(), 1.0))
  f32 = lambda x: (x * m).astype(np.float32)
  return {'advantages': f32(adv), 'returns': f32(returns),
          'old_values': f32(values)}, metrics


def make_rollout_fn(cfg: grpo.RLConfig, apply_fn, loss_chunk: int = 0):
  """(params, batch) -> {'logps': [B, T] at rl.temperature, 'values': [B, T]}: the old policy
  and critic of a rollout batch, from one trunk pass."""
  def fn(params, batch):
    hidden, _ = apply_fn(params, batch['inputs'], positions=batch['positions'],
                         segment_ids=batch['segment_ids'], return_hidden=True)
    stats = losses.hidden_stats(params, hidden, batch['targets'], apply_fn, loss_chunk,
                                cfg.temperature)
    values = apply_fn(params, hidden, method=Transformer.values)
    return {'logps': stats['logprobs'], 'values': values}
  return fn


def make_loss_fn(cfg: grpo.RLConfig):
  """loss_fn(params, batch, apply_fn[, ref_params], loss_chunk=0) -> LossOutput.

  batch: GRPO's rollout batch (`llmjax.rl.rollout.to_batch`) with token-level advantages,
    returns, old_values and old_logps [B, T] (`rollout_targets`)."""

  def loss_fn(params, batch, apply_fn, ref_params=None, loss_chunk: int = 0):
    del ref_params  # the KL is in the rewards (the rollout's), not in the loss
    hidden, _ = apply_fn(params, batch['inputs'], positions=batch['positions'],
                         segment_ids=batch['segment_ids'], return_hidden=True)
    stats = losses.hidden_stats(params, hidden, batch['targets'], apply_fn, loss_chunk,
                                cfg.temperature)
    vpred = apply_fn(params, hidden, method=Transformer.values)  # [B, T] float32
    mask = batch['completion_mask'].astype(jnp.float32)
    adv = batch['advantages'].astype(jnp.float32)
    old_values = batch['old_values'].astype(jnp.float32)
    returns = batch['returns'].astype(jnp.float32)
    log_ratio = stats['logprobs'] - batch['old_logps']
    ratio = jnp.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    pg = jnp.maximum(pg1, pg2)
    vclip = jnp.clip(vpred, old_values - cfg.cliprange_value, old_values + cfg.cliprange_value)
    vf1 = jnp.square(vpred - returns)
    vf2 = jnp.square(vclip - returns)
    vf = 0.5 * jnp.maximum(vf1, vf2)
    sums = lambda x: (jnp.sum(x * mask), jnp.sum(mask))
    metrics = {'loss/policy_avg': sums(pg), 'loss/value_avg': sums(vf),
               'policy/clipfrac_avg': sums((pg2 > pg1).astype(jnp.float32)),
               'val/clipfrac_avg': sums((vf2 > vf1).astype(jnp.float32)),
               'policy/approxkl_avg': sums(0.5 * jnp.square(log_ratio)),
               'policy/entropy_avg': sums(stats['entropy']),
               'entropy': sums(stats['entropy'])}
    return losses.LossOutput(total=jnp.sum((pg + cfg.vf_coef * vf) * mask),
                             weight=jnp.sum(mask), metrics=metrics)

  return loss_fn
