"""GRPO (train.objective='grpo'): group-relative advantages and the clipped policy loss, as
TRL 1.16 defines them (trl/trainer/grpo_trainer.py), through the one train step.

Advantages (`GRPOTrainer._generate_and_score_completions`, multi_objective_aggregation
'sum_then_normalize'): the rewards of the F functions weighted and summed per completion, minus
the mean of its group (the `rl.num_generations` completions of one prompt), divided by
`std + 1e-4` where std is the group's (`rl.scale_rewards='group'`), the whole batch's
('batch') or not at all ('none'); std is Bessel-corrected (TRL's `nanstd`). A group whose
rewards are all equal (std 0) has advantage 0 for every member: it teaches nothing
(`frac_reward_zero_std` counts them).

Loss (`GRPOTrainer._compute_loss`), per completion token t of completion i:
    log_ratio = logp(t) - old_logp(t)          token level (`rl.importance_sampling_level`)
              = masked mean over i's tokens     'sequence' level (GSPO), one ratio for all t
    coef_1 = exp(log_ratio); coef_2 = clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    loss(t) = -min(coef_1 * A_i, coef_2 * A_i) + beta * kl(t)
    kl(t)   = exp(ref_logp - logp) - (ref_logp - logp) - 1          (k3, Schulman's estimator)
log-probs are of softmax(logits / rl.temperature), the distribution the rollouts sample from
(`_get_per_token_logps_and_entropies` divides by the temperature). With rl.num_iterations = 1
old_logp is logp itself, detached (the ratio is 1, its gradient the policy gradient);
otherwise it is the policy's log-prob when the rollout batch was made (a forward pass before
its first update), and each batch is used for num_iterations updates.

Normalisation (`rl.loss_type`), as LossOutput sums (llmjax.train.losses: the step divides
total by weight once over the whole global batch, so each is exact under gradient accumulation
and data parallelism, where TRL's 'grpo', 'bnpo' and 'dr_grpo' average per micro-batch):
    grpo      total = sum_i mean_t loss(i, t)             weight = completions
    bnpo      total = sum_{i,t} loss(i, t)                weight = completion tokens
    dapo      the same as bnpo here: TRL's dapo is bnpo normalised by the global token count
              (`num_items_in_batch`), which is what every loss here is (TRL's default)
    dr_grpo   total = sum_{i,t} loss(i, t)                weight = completions x
              rl.max_completion_length (a constant: no length bias, Dr. GRPO)

Sampler correction (`rl.sampler_is`, TRL's vllm_importance_sampling_correction): when rollouts
come from another program than the trainer's (bf16 sampling), each token's loss is multiplied
by min(exp(old_logp - sampler_logp), rl.sampler_is_cap), per token ('token') or with one ratio
per completion from the summed log-ratio ('sequence'). Here the rollouts run the trainer's own
model on the same params, so the default is '' (no correction); the engine's log-probs are of
the model at temperature 1, so the correction needs rl.temperature = 1.

Metrics, TRL's names: `kl` (beta > 0), `entropy`, `clip_ratio/low_mean`, `clip_ratio/high_mean`,
`clip_ratio/region_mean` (token means over completion tokens; at the sequence level, means over
completions); the reward metrics are the loop's (`llmjax.rl.loop`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import ConfigError, closest
from llmjax.train import losses

LOSS_TYPES = ('grpo', 'bnpo', 'dr_grpo', 'dapo')
SCALE_REWARDS = ('group', 'batch', 'none')
IS_LEVELS = ('token', 'sequence')
SAMPLER_IS = ('', 'token', 'sequence')


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """config.rl, checked: the settings GRPO and RLOO (`llmjax.rl.rloo`) share, and theirs."""
  num_generations: int = 8
  max_completion_length: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  loss_type: str = 'dapo'
  scale_rewards: str = 'group'
  epsilon_low: float = 0.2
  epsilon_high: float = 0.2
  beta: float = 0.0
  num_iterations: int = 1
  importance_sampling_level: str = 'token'
  sampler_is: str = ''
  sampler_is_cap: float = 3.0
  normalize_advantages: bool = False  # RLOO: advantages standardised over the batch
  # PPO (`llmjax.rl.ppo`), TRL's PPOConfig defaults: discount and GAE lambda, the value loss's
  # weight and clip range, whitened advantages.
  gamma: float = 1.0
  lam: float = 0.95
  vf_coef: float = 0.1
  cliprange_value: float = 0.2
  whiten_advantages: bool = True

  @classmethod
  def from_config(cls, rl) -> 'RLConfig':
    """config.rl -> a checked RLConfig (one-line ConfigErrors naming the key)."""
    fields = {f.name: rl[f.name] for f in dataclasses.fields(cls) if f.name in rl}
    cfg = cls(**fields)
    for key, allowed in (('loss_type', LOSS_TYPES), ('scale_rewards', SCALE_REWARDS),
                         ('importance_sampling_level', IS_LEVELS), ('sampler_is', SAMPLER_IS)):
      value = getattr(cfg, key)
      if value not in allowed:
        raise ConfigError(f"rl.{key}={value!r} is not one of {list(allowed)}."
                          f"{closest(str(value), allowed)}")
    if cfg.num_generations < 1:
      raise ConfigError(f"rl.num_generations={cfg.num_generations} must be >= 1.")
    if cfg.num_generations == 1 and cfg.scale_rewards == 'group':
      raise ConfigError("rl.num_generations=1 with rl.scale_rewards='group': a group of one has"
                        " no spread, so every advantage would be 0; sample >= 2 per prompt.")
    for key in ('max_completion_length', 'num_iterations'):
      if getattr(cfg, key) < 1:
        raise ConfigError(f"rl.{key}={getattr(cfg, key)} must be >= 1.")
    if cfg.temperature <= 0:
      raise ConfigError(f"rl.temperature={cfg.temperature} must be > 0: GRPO learns from"
                        " sampled completions (greedy groups are identical).")
    if not 0 < cfg.top_p <= 1:
      raise ConfigError(f"rl.top_p={cfg.top_p} must be in (0, 1].")
    for key in ('gamma', 'lam'):
      if not 0 <= getattr(cfg, key) <= 1:
        raise ConfigError(f"rl.{key}={getattr(cfg, key)} must be in [0, 1].")
    if cfg.vf_coef < 0 or cfg.cliprange_value <= 0:
      raise ConfigError(f"rl.vf_coef={cfg.vf_coef} must be >= 0 and rl.cliprange_value="
                        f"{cfg.cliprange_value} > 0.")
    if cfg.epsilon_low < 0 or cfg.epsilon_high < 0 or cfg.beta < 0:
      raise ConfigError("rl.epsilon_low, rl.epsilon_high and rl.beta must be >= 0.")
    if cfg.sampler_is and cfg.temperature != 1.0:
      raise ConfigError(f"rl.sampler_is='{cfg.sampler_is}' compares the trainer's log-probs at"
                        f" rl.temperature={cfg.temperature} with the engine's, which are the"
                        " model's at temperature 1; set rl.temperature=1 or rl.sampler_is=''.")
    return cfg

  @property
  def uses_old_logps(self) -> bool:
    return self.num_iterations > 1 or bool(self.sampler_is)


def advantages(rewards_per_func: np.ndarray, weights: np.ndarray, num_generations: int,
               scale: str) -> tuple[np.ndarray, dict]:
  """[N, F] rewards (N = prompts x num_generations, groups contiguous) -> (advantages [N],
  metrics: reward, reward_std, frac_reward_zero_std, rewards/<j>/mean|std by column index)."""
  rewards = rewards_per_func @ weights  # [N]
  groups = rewards.reshape(-1, num_generations)
  mean = np.repeat(groups.mean(axis=1), num_generations)

  def std(x, axis=None):
    n = x.shape[axis] if axis is not None else x.size
    return np.std(x, axis=axis, ddof=1) if n > 1 else np.zeros(() if axis is None else x.shape[0])

  if scale == 'batch':
    spread = np.full_like(rewards, std(rewards))
  else:  # 'group' scales by it; 'none' only logs it
    spread = np.repeat(std(groups, axis=1), num_generations)
  adv = rewards - mean
  if scale != 'none':
    adv = adv / (spread + 1e-4)
  metrics = {'reward': float(rewards.mean()), 'reward_std': float(std(rewards)),
             'frac_reward_zero_std': float(np.isclose(spread, 0.0).mean())}
  return adv, metrics


def _masked_sums(x, mask):
  return jnp.sum(x * mask), jnp.sum(mask)


def make_loss_fn(cfg: RLConfig):
  """loss_fn(params, batch, apply_fn[, ref_params], loss_chunk=0) -> LossOutput.

  batch: inputs/targets/positions/segment_ids [B, T] int32 (prompt + completion, one per row),
    completion_mask [B, T] (1 where the target is a completion token, EOS included),
    advantages [B, 1], old_logps and sampler_logps [B, T] (read only when the config uses them).
  """

  def loss_fn(params, batch, apply_fn, ref_params=None, loss_chunk: int = 0):
    stats = losses.token_stats(params, batch, apply_fn, loss_chunk, cfg.temperature)
    logp = stats['logprobs']  # [B, T]
    mask = batch['completion_mask'].astype(jnp.float32)
    adv = batch['advantages'].astype(jnp.float32).reshape(-1, 1)  # [B, 1]
    # One update per batch: the old policy is this one (detached), whatever the batch holds.
    old = batch['old_logps'] if cfg.num_iterations > 1 else None
    old = jax.lax.stop_gradient(logp) if old is None else old
    log_ratio = logp - old
    ntok = jnp.maximum(mask.sum(-1), 1.0)  # [B]
    if cfg.importance_sampling_level == 'sequence':
      log_w = (jnp.sum(log_ratio * mask, -1) / ntok)[:, None]  # [B, 1]
    else:
      log_w = log_ratio
    coef_1 = jnp.exp(log_w)
    coef_2 = jnp.clip(coef_1, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    per_token = -jnp.minimum(coef_1 * adv, coef_2 * adv)  # [B, T] or [B, 1]
    per_token = jnp.broadcast_to(per_token, logp.shape)
    if cfg.sampler_is:
      sampler = batch['sampler_logps']  # NaN where the engine gave none (an EOS): ratio 1
      diff = jnp.where(jnp.isnan(sampler), 0.0, batch['old_logps'] - sampler)
      if cfg.sampler_is == 'sequence':
        diff = jnp.sum(diff * mask, -1, keepdims=True)
      per_token = per_token * jnp.minimum(jnp.exp(diff), cfg.sampler_is_cap)
    metrics = {'entropy': _masked_sums(stats['entropy'], mask)}
    if cfg.beta:
      ref = jax.lax.stop_gradient(
          losses.token_stats(ref_params, batch, apply_fn, loss_chunk, cfg.temperature)['logprobs'])
      kl = jnp.exp(ref - logp) - (ref - logp) - 1
      per_token = per_token + cfg.beta * kl
      metrics['kl'] = _masked_sums(kl, mask)
    rows = jnp.sum(jnp.any(mask > 0, axis=-1).astype(jnp.float32))
    if cfg.loss_type == 'grpo':
      total = jnp.sum(jnp.sum(per_token * mask, -1) / ntok)
      weight = rows
    elif cfg.loss_type == 'dr_grpo':
      total = jnp.sum(per_token * mask)
      weight = rows * cfg.max_completion_length
    else:  # bnpo, dapo
      total = jnp.sum(per_token * mask)
      weight = jnp.sum(mask)
    low = ((coef_1 < 1 - cfg.epsilon_low) & (adv < 0)).astype(jnp.float32)
    high = ((coef_1 > 1 + cfg.epsilon_high) & (adv > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    if cfg.importance_sampling_level == 'sequence':  # one value per completion
      seq = jnp.any(mask > 0, axis=-1, keepdims=True).astype(jnp.float32)
      clip = lambda x: (jnp.sum(x * seq), jnp.sum(seq))
    else:
      clip = lambda x: _masked_sums(x, mask)
    metrics.update({'clip_ratio/low_mean': clip(low), 'clip_ratio/high_mean': clip(high),
                    'clip_ratio/region_mean': clip(region)})
    return losses.LossOutput(total=total, weight=weight, metrics=metrics)

  return loss_fn


def make_logps_fn(cfg: RLConfig, apply_fn, loss_chunk: int = 0):
  """(params, batch) -> [B, T] float32 log-probs at rl.temperature: the old policy's, computed
  once per rollout batch when rl.num_iterations > 1 (or the sampler correction is on)."""
  def fn(params, batch):
    return losses.token_stats(params, batch, apply_fn, loss_chunk, cfg.temperature)['logprobs']
  return fn
