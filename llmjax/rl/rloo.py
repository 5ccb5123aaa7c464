"""RLOO (train.objective='rloo'): REINFORCE with a leave-one-out baseline, as TRL 1.16's
RLOOTrainer defines it (trl/trainer/rloo_trainer.py), through the one train step and the RL
loop of GRPO (`llmjax.rl.loop`; settings in config.rl, `grpo.RLConfig`).

Advantages (`RLOOTrainer._generate_and_score_completions`):
    r_i   = sum_j w_j reward_j(i) - beta * sum_t (old_logp(t) - ref_logp(t))
            (the KL folded into the reward with the first-order log-ratio estimate, summed over
            the completion, as the RLOO paper; it can be negative per token)
    b_i   = (sum of r over i's group - r_i) / (num_generations - 1)   (the others' mean)
    A_i   = r_i - b_i, standardised over the batch with rl.normalize_advantages
            ((A - mean) / (std + 1e-4), Bessel's std)
old_logp is the policy's at rollout time (a forward pass at rl.temperature), ref_logp the frozen
reference's (rl.beta > 0).

Loss (`RLOOTrainer._compute_loss`), one ratio per completion from the summed log-probs:
    ratio_i = exp(sum_t logp(t) - sum_t old_logp(t))
    loss_i  = -min(ratio_i * A_i, clip(ratio_i, 1 - epsilon_low, 1 + epsilon_high) * A_i)
averaged over completions (total = sum_i loss_i, weight = completions: exact under gradient
accumulation, where TRL averages per micro-batch). Metrics: `entropy` (token mean),
`clip_ratio/low_mean|high_mean|region_mean` (means over completions); `kl` (token mean of the
log-ratio) is the loop's, from the rollout batch.
"""

import jax.numpy as jnp
import numpy as np

from llmjax.rl import grpo
from llmjax.train import losses


def advantages(rewards_per_func: np.ndarray, weights: np.ndarray, num_generations: int, *,
               kl: np.ndarray | None = None, beta: float = 0.0,
               normalize: bool = False) -> tuple[np.ndarray, dict]:
  """[N, F] rewards (groups contiguous) and the completions' summed log-ratios kl [N] ->
  (advantages [N], metrics: reward, reward_std, frac_reward_zero_std of the reward with the
  KL penalty, as TRL logs them)."""
  rewards = rewards_per_func @ weights
  if beta and kl is not None:
    rewards = rewards - beta * kl
  groups = rewards.reshape(-1, num_generations)
  baseline = (groups.sum(axis=1, keepdims=True) - groups) / (num_generations - 1)
  adv = (groups - baseline).reshape(-1)
  if normalize:
    adv = (adv - adv.mean()) / ((np.std(adv, ddof=1) if adv.size > 1 else 0.0) + 1e-4)
  spread = groups.std(axis=1, ddof=1)
  metrics = {'reward': float(rewards.mean()),
             'reward_std': float(np.std(rewards, ddof=1)) if rewards.size > 1 else 0.0,
             'frac_reward_zero_std': float(np.isclose(spread, 0.0).mean())}
  return adv, metrics


def make_loss_fn(cfg: grpo.RLConfig):
  """loss_fn(params, batch, apply_fn, loss_chunk=0) -> LossOutput; batch as GRPO's
  (`llmjax.rl.rollout.to_batch`) with old_logps [B, T] always the rollout-time policy's."""

  def loss_fn(params, batch, apply_fn, ref_params=None, loss_chunk: int = 0):
    del ref_params  # the KL is in the reward (the loop's), not in the loss
    stats = losses.token_stats(params, batch, apply_fn, loss_chunk, cfg.temperature)
    mask = batch['completion_mask'].astype(jnp.float32)
    adv = batch['advantages'].astype(jnp.float32).reshape(-1)  # [B]
    logps = jnp.sum(stats['logprobs'] * mask, -1)
    old = jnp.sum(batch['old_logps'] * mask, -1)
    coef_1 = jnp.exp(logps - old)
    coef_2 = jnp.clip(coef_1, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    per_seq = -jnp.minimum(coef_1 * adv, coef_2 * adv)
    rows = jnp.any(mask > 0, axis=-1).astype(jnp.float32)
    low = ((coef_1 < 1 - cfg.epsilon_low) & (adv < 0)).astype(jnp.float32)
    high = ((coef_1 > 1 + cfg.epsilon_high) & (adv > 0)).astype(jnp.float32)
    clip = lambda x: (jnp.sum(x * rows), jnp.sum(rows))
    metrics = {'entropy': (jnp.sum(stats['entropy'] * mask), jnp.sum(mask)),
               'clip_ratio/low_mean': clip(low), 'clip_ratio/high_mean': clip(high),
               'clip_ratio/region_mean': clip(jnp.maximum(low, high))}
    return losses.LossOutput(total=jnp.sum(per_seq * rows), weight=jnp.sum(rows),
                             metrics=metrics)

  return loss_fn
