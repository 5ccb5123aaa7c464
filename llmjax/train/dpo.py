"""The DPO family of preference losses, formulas exactly as TRL 1.16 implements them.

    cfg = DPOConfig.from_config(config.dpo)        # cfg.check() raises one-line ConfigErrors
    check_data_format(cfg.loss, config.data.format)
    loss_fn = make_loss_fn(cfg, num_pairs=P, loss_chunk=config.train.loss_chunk)
    out = loss_fn(params, batch, apply_fn, ref_params)   # a losses.LossOutput
    metrics = derived_metrics(cfg, losses.reduce_output(summed_out))

`dpo.loss` (the registry `LOSSES`), with TRL's trainer and name:
  sigmoid       DPOTrainer 'sigmoid'       -log sigmoid(beta * delta)             (DPO, Rafailov 2023)
  hinge         DPOTrainer 'hinge'         relu(1 - beta * delta)                 (SLiC, Zhao 2023)
  ipo           DPOTrainer 'ipo'           (delta_avg - 1 / (2 beta))^2            (IPO, Azar 2023, Eq. 17)
  robust        DPOTrainer 'robust'        ((1-e) l(beta d) - e l(-beta d)) / (1-2e), l = -log sigmoid,
                                           e = dpo.label_smoothing                (rDPO, Chowdhury 2024)
  sigmoid_norm  DPOTrainer 'sigmoid_norm'  -log sigmoid(beta * delta_avg)          (Tulu 3, Lambert 2024)
  simpo         CPOTrainer 'simpo'         -log sigmoid(beta (a_c - a_r) - gamma), label-smoothed like
                                           robust without the 1/(1-2e)            (SimPO, Meng 2024)
  orpo          ORPOTrainer                NLL(chosen, prompt included) - beta log sigmoid(log odds)
                                                                                  (ORPO, Hong 2024)
  kto           KTOTrainer 'kto'           w_d (1 - sigmoid(beta (r - z))) or w_u (1 - sigmoid(beta (z - r)))
                                                                                  (KTO, Ethayarajh 2024)
where, per pair, delta = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)) with log-probs
*summed* over the completion's tokens (EOS included), delta_avg the same with each log-ratio
divided by its completion's token count, a_c/a_r the policy's *mean* token log-probs
(reference-free), and for KTO r = log pi(y) - log ref(y) and z the batch KL estimate.
`dpo.sft_weight` (TRL: DPO loss_type ['...', 'sft'] with loss_weights [1, w], the RPO loss of
Pang 2024; CPO's `cpo_alpha`) adds w x the NLL of the chosen completions, averaged over their
tokens in the batch (TRL's normalisation: a token mean, not a mean of per-pair means).

Batches (the preference contract of issue 12): a row packs P pairs; pair k is segment 2k+1
(prompt + chosen) and 2k+2 (prompt + rejected); `pair_mask` [B, P] marks real pairs. For KTO,
segment 2k+1 is example k (prompt + completion) and 2k+2 its KL counterpart (the same prompt
with the completion of the previous example of the batch, TRL's rotation), `label` [B, P] 1 for
desirable. `ref_logps` [B, 2P] (segment order), when present, replaces the reference forward.

Metrics, TRL's names and TRL's averaging (reduce_output of the summed LossOutput gives them):
  rewards/chosen, rewards/rejected  beta x log-ratio (sums; simpo/orpo: beta x mean token logp),
  rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (sums; simpo/orpo: token
  means): means over pairs. logits/chosen, logits/rejected: the mean over the vocabulary of
  the logits, averaged over all completion tokens of the batch (DPO and KTO in TRL 1.16; TRL's
  CPO and ORPO average the padded [batch, length, vocab] tensor instead, prompt and padding
  included, which has no packing-independent meaning: here they use the DPO definition).
  entropy (completion tokens), mean_token_accuracy (chosen tokens, top-1 = target), nll_loss
  (the chosen NLL: token mean; orpo: ORPO's prompt-included NLL), orpo's log_odds_ratio (mean
  log sigmoid(log odds)) and log_odds_chosen (mean log odds), kto's kl. KTO's rewards/* and
  logps/* are means over the desirable (chosen) or undesirable (rejected) examples and its
  rewards/margins their difference (`derived_metrics`).

Gradient accumulation: every pair term is exact under it (sums over pairs); the token-mean NLL
terms (sft_weight, orpo) and KTO's KL estimate are computed per micro-batch, as TRL does per
device batch, so with grad_accum > 1 they are means of micro-batch values.
"""

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from llmjax.errors import ConfigError, closest
from llmjax.train import losses

Array = jax.Array


def _logsig(x):
  return jax.nn.log_sigmoid(x)


def _avg(logps, counts):
  """Sums over a completion's tokens -> means (an empty slot divides by 1, as TRL clamps)."""
  return logps / jnp.maximum(counts, 1.0)


# Each pair loss: (policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_counts,
# rejected_counts, cfg) -> per-pair loss; every array [...] float32, log-probs summed over the
# completion's tokens. Reference-free losses ignore ref_*.

def sigmoid_loss(pc, pr, rc, rr, nc, nr, cfg):
  """DPO (Rafailov et al. 2023, Eq. 7)."""
  return -_logsig(cfg.beta * ((pc - rc) - (pr - rr)))


def hinge_loss(pc, pr, rc, rr, nc, nr, cfg):
  """SLiC's hinge on the DPO logit (Zhao et al. 2023)."""
  return jax.nn.relu(1.0 - cfg.beta * ((pc - rc) - (pr - rr)))


def ipo_loss(pc, pr, rc, rr, nc, nr, cfg):
  """IPO (Azar et al. 2023, Eq. 17), beta = tau; log-ratios length-normalised as TRL (which
  confirmed with the authors that the paper's results use this form)."""
  delta = _avg(pc - rc, nc) - _avg(pr - rr, nr)
  return (delta - 1.0 / (2.0 * cfg.beta)) ** 2


def robust_loss(pc, pr, rc, rr, nc, nr, cfg):
  """Robust DPO (Chowdhury et al. 2024): unbiased under labels flipped with probability e."""
  z = cfg.beta * ((pc - rc) - (pr - rr))
  e = cfg.label_smoothing
  return (-(1.0 - e) * _logsig(z) + e * _logsig(-z)) / (1.0 - 2.0 * e)


def sigmoid_norm_loss(pc, pr, rc, rr, nc, nr, cfg):
  """Length-normalised DPO, the Tulu 3 loss (Lambert et al. 2024)."""
  return -_logsig(cfg.beta * (_avg(pc - rc, nc) - _avg(pr - rr, nr)))


def simpo_loss(pc, pr, rc, rr, nc, nr, cfg):
  """SimPO (Meng et al. 2024, Eq. 6) as TRL's CPOTrainer(loss_type='simpo'): mean token
  log-probs, margin gamma, label smoothing as CPO's sigmoid loss."""
  z = cfg.beta * (_avg(pc, nc) - _avg(pr, nr)) - cfg.simpo_gamma
  e = cfg.label_smoothing
  return -(1.0 - e) * _logsig(z) - e * _logsig(-z)


def _log1mexp(x):
  """log(1 - exp(x)) for x < 0, branching at -log 2 as TRL (no cancellation either side)."""
  return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_log_odds(pc, pr, nc, nr):
  """ORPO's log odds ratio log(odds(y_c) / odds(y_r)), odds(y) = p / (1 - p) with p the mean
  token probability exp(mean log p) (Hong et al. 2024, Eq. 4 and 7)."""
  ac, ar = _avg(pc, nc), _avg(pr, nr)
  return (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))


def orpo_loss(pc, pr, rc, rr, nc, nr, cfg):
  """ORPO's odds-ratio term -beta log sigmoid(log odds); make_loss_fn adds the chosen NLL."""
  return -cfg.beta * _logsig(orpo_log_odds(pc, pr, nc, nr))


class LossSpec(NamedTuple):
  """One `dpo.loss`: its pair formula (None: KTO's unpaired one), whether it needs a reference
  model, its data format, and whether its rewards/logps use mean token log-probs."""
  pair_fn: Callable | None
  uses_reference: bool
  data_format: str
  mean_logps: bool


LOSSES = {
    'sigmoid': LossSpec(sigmoid_loss, True, 'preference', False),
    'hinge': LossSpec(hinge_loss, True, 'preference', False),
    'ipo': LossSpec(ipo_loss, True, 'preference', False),
    'robust': LossSpec(robust_loss, True, 'preference', False),
    'sigmoid_norm': LossSpec(sigmoid_norm_loss, True, 'preference', False),
    'simpo': LossSpec(simpo_loss, False, 'preference', True),
    'orpo': LossSpec(orpo_loss, False, 'preference', True),
    'kto': LossSpec(None, True, 'unpaired_preference', False),
}
LABEL_SMOOTHING_LOSSES = ('robust', 'simpo')


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """config.dpo's loss keys; defaults are TRL's (DPOConfig / CPOConfig / KTOConfig)."""
  loss: str = 'sigmoid'
  beta: float = 0.1  # TRL's DPO/ORPO/KTO default; SimPO's paper uses 2.0-2.5 with gamma/beta ~ 0.5
  label_smoothing: float = 0.0  # robust: flip probability in [0, 0.5); simpo: in [0, 1)
  simpo_gamma: float = 0.5  # TRL CPOConfig's default target margin
  desirable_weight: float = 1.0  # kto: weight of desirable examples' losses
  undesirable_weight: float = 1.0  # kto: weight of undesirable examples' losses
  sft_weight: float = 0.0  # RPO: + sft_weight x token-mean NLL of the chosen completions

  @classmethod
  def from_config(cls, dpo_cfg) -> 'DPOConfig':
    """From `config.dpo` (a ConfigDict or dict; keys not listed here are left to others),
    checked."""
    get = dpo_cfg.get if hasattr(dpo_cfg, 'get') else lambda k, d: getattr(dpo_cfg, k, d)
    kw = {f.name: get(f.name, f.default) for f in dataclasses.fields(cls)}
    cfg = cls(**kw)
    cfg.check()
    return cfg

  @property
  def spec(self) -> LossSpec:
    return LOSSES[self.loss]

  @property
  def uses_reference(self) -> bool:
    return LOSSES[self.loss].uses_reference

  def check(self):
    """One-line ConfigErrors naming the key and the fix."""
    if self.loss not in LOSSES:
      raise ConfigError(f"dpo.loss='{self.loss}' is not one of {sorted(LOSSES)}."
                        f"{closest(str(self.loss), LOSSES)}")
    for key in ('beta', 'label_smoothing', 'simpo_gamma', 'desirable_weight',
                'undesirable_weight', 'sft_weight'):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"dpo.{key}={value!r} must be a finite number.")
    if self.beta <= 0:
      raise ConfigError(f"dpo.beta={self.beta} must be > 0 (TRL's default is 0.1).")
    if self.label_smoothing and self.loss not in LABEL_SMOOTHING_LOSSES:
      raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} only applies to dpo.loss in"
                        f" {LABEL_SMOOTHING_LOSSES}, not '{self.loss}'; set it to 0.")
    if self.loss == 'robust' and not 0 <= self.label_smoothing < 0.5:
      raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5) for"
                        " dpo.loss='robust' (the probability that a label is flipped).")
    if not 0 <= self.label_smoothing < 1:
      raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 1).")
    if self.simpo_gamma < 0:
      raise ConfigError(f"dpo.simpo_gamma={self.simpo_gamma} must be >= 0 (the target margin).")
    for key in ('desirable_weight', 'undesirable_weight'):
      if getattr(self, key) <= 0:
        raise ConfigError(f"dpo.{key}={getattr(self, key)} must be > 0.")
    if self.sft_weight < 0:
      raise ConfigError(f"dpo.sft_weight={self.sft_weight} must be >= 0.")


def check_data_format(loss: str, data_format: str):
  """KTO trains on unpaired data, every other loss on pairs: a one-line ConfigError otherwise."""
  if loss not in LOSSES:
    raise ConfigError(f"dpo.loss='{loss}' is not one of {sorted(LOSSES)}.{closest(str(loss), LOSSES)}")
  want = LOSSES[loss].data_format
  if data_format != want:
    hint = ("KTO needs {prompt, completion, label} records" if loss == 'kto' else
            "this loss needs {prompt, chosen, rejected} pairs (dpo.loss='kto' trains on unpaired data)")
    raise ConfigError(f"dpo.loss='{loss}' needs data.format='{want}', not '{data_format}': {hint}.")


def pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_counts,
                rejected_counts, cfg: DPOConfig):
  """Per-pair loss and rewards of a paired loss, float32.

  Args: policy_*/ref_* [...] log-probs summed over each completion's tokens (ref_* may be None
    for simpo/orpo), *_counts [...] its token counts.
  Returns: (loss [...], chosen_rewards [...], rejected_rewards [...]). Rewards are TRL's:
    beta x (policy - ref) summed log-probs; simpo/orpo: beta x the policy's mean token log-prob.
    orpo's loss here is the odds-ratio term only (make_loss_fn adds the NLL).
  """
  spec = LOSSES[cfg.loss]
  if spec.pair_fn is None:
    raise ValueError(f"dpo.loss='{cfg.loss}' is unpaired: use kto_losses.")
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  pc, pr, nc, nr = map(f32, (policy_chosen, policy_rejected, chosen_counts, rejected_counts))
  if spec.uses_reference:
    rc, rr = f32(ref_chosen), f32(ref_rejected)
    chosen_rewards, rejected_rewards = cfg.beta * (pc - rc), cfg.beta * (pr - rr)
  else:
    rc = rr = jnp.zeros_like(pc)
    chosen_rewards, rejected_rewards = cfg.beta * _avg(pc, nc), cfg.beta * _avg(pr, nr)
  loss = spec.pair_fn(pc, pr, rc, rr, nc, nr, cfg)
  return loss, jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards)


def kto_kl(policy_kl, ref_kl, mask):
  """KTO's reference point z: the batch mean of log pi(y'|x) - log ref(y'|x) over the
  mismatched (KL) completions, clamped at 0 and not differentiated (Ethayarajh et al. 2024,
  Sec. 4.1; TRL: mean, gather, clamp(min=0), detach). All [...]; mask 0 drops empty slots."""
  mask = jnp.asarray(mask, jnp.float32)
  diff = (jnp.asarray(policy_kl, jnp.float32) - jnp.asarray(ref_kl, jnp.float32)) * mask
  mean = jnp.sum(diff) / jnp.maximum(jnp.sum(mask), 1.0)
  return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_losses(policy, ref, kl, label, cfg: DPOConfig):
  """Per-example KTO loss (TRL's 'kto', the paper's Eq. 7 with the sigmoid value function).

  Args: policy, ref [...] summed completion log-probs; kl: scalar, `kto_kl`; label [...] 1
    desirable / 0 undesirable.
  Returns: (weighted loss [...], rewards [...] = beta x (policy - ref)).
  """
  logratio = jnp.asarray(policy, jnp.float32) - jnp.asarray(ref, jnp.float32)
  desirable = jnp.asarray(label, jnp.float32) > 0.5
  loss = jnp.where(desirable,
                   cfg.desirable_weight * (1.0 - jax.nn.sigmoid(cfg.beta * (logratio - kl))),
                   cfg.undesirable_weight * (1.0 - jax.nn.sigmoid(cfg.beta * (kl - logratio))))
  return loss, jax.lax.stop_gradient(cfg.beta * logratio)


def _sums(values, batch, mask, num_segments):
  return losses.segment_sums(values * mask, batch['segment_ids'], num_segments)


def make_loss_fn(cfg: DPOConfig, num_pairs: int, loss_chunk: int = 0):
  """The loss of `cfg.loss` over preference batches with `num_pairs` pairs (P) per row.

  Returns loss_fn(params, batch, apply_fn, ref_params=None) -> losses.LossOutput with
  total = sum over real pairs (KTO: examples) of the loss, weight = their number (so the step
  reports TRL's mean over pairs), metrics as in the module docstring. One policy forward pass
  over the rows (both halves of a pair are segments of one row); the reference's summed
  log-probs come from batch['ref_logps'] when present, else from a forward pass with
  `ref_params` under stop_gradient; reference-free losses use neither. loss_chunk: as in
  `losses.token_logprobs`, applied to the policy (statistics included) and the reference.
  """
  cfg.check()
  spec = LOSSES[cfg.loss]
  num_segments = 2 * num_pairs

  def reference_logps(batch, apply_fn, ref_params):
    if 'ref_logps' in batch:
      return jax.lax.stop_gradient(jnp.asarray(batch['ref_logps'], jnp.float32))
    if ref_params is None:
      raise ValueError(f"dpo.loss='{cfg.loss}' needs a reference: pass ref_params or put"
                       " 'ref_logps' in the batch.")
    ref_params = jax.lax.stop_gradient(ref_params)
    lp = losses.token_logprobs(ref_params, batch, apply_fn, loss_chunk)
    mask = batch['loss_mask'].astype(jnp.float32)
    return jax.lax.stop_gradient(_sums(lp, batch, mask, num_segments))

  def loss_fn(params, batch, apply_fn, ref_params=None) -> losses.LossOutput:
    stats = losses.token_stats(params, batch, apply_fn, loss_chunk)  # each [B, T]
    mask = batch['loss_mask'].astype(jnp.float32)  # completion tokens
    seg_sum = lambda v, m=mask: _sums(v, batch, m, num_segments)  # [B, 2P]
    logps, counts = seg_sum(stats['logprobs']), seg_sum(jnp.ones_like(mask))
    logit_sums, entropy_sums = seg_sum(stats['mean_logit']), seg_sum(stats['entropy'])
    pair_mask = jnp.asarray(batch['pair_mask'], jnp.float32)  # [B, P]
    n = jnp.sum(pair_mask)
    first, second = slice(0, None, 2), slice(1, None, 2)  # chosen / rejected (KTO: KL) columns
    ref = reference_logps(batch, apply_fn, ref_params) if spec.uses_reference else None

    def chosen_nll(m):
      """(sum of -log p over chosen segments' positions where m is 1, their count)."""
      s, c = seg_sum(-stats['logprobs'], m), seg_sum(jnp.ones_like(m), m)
      sel = jnp.concatenate([pair_mask[..., None], jnp.zeros_like(pair_mask)[..., None]],
                            -1).reshape(c.shape)  # 1 on real chosen columns
      return jnp.sum(s * sel), jnp.sum(c * sel)

    metrics = {}
    if cfg.loss == 'kto':
      label = jnp.asarray(batch['label'], jnp.float32) * pair_mask  # [B, P]
      undesirable = (1.0 - label) * pair_mask
      kl = kto_kl(logps[:, second], ref[:, second], pair_mask)
      loss, rewards = kto_losses(logps[:, first], ref[:, first], kl, label, cfg)
      total = jnp.sum(loss * pair_mask)
      lp = logps[:, first]
      for name, w in (('chosen', label), ('rejected', undesirable)):
        metrics[f'rewards/{name}'] = (jnp.sum(rewards * w), jnp.sum(w))
        metrics[f'logps/{name}'] = (jnp.sum(lp * w), jnp.sum(w))
        metrics[f'logits/{name}'] = (jnp.sum(logit_sums[:, first] * w),
                                     jnp.sum(counts[:, first] * w))
      metrics['kl'] = kl * n  # reported divided by n: the batch's estimate
      metrics['entropy'] = (jnp.sum(entropy_sums[:, first] * pair_mask),
                            jnp.sum(counts[:, first] * pair_mask))
      nll_sum, nll_count = jnp.sum(-lp * label), jnp.sum(counts[:, first] * label)
    else:
      # Empty slots get finite stand-ins (log-prob -1 over 1 token): a formula's NaN there
      # (orpo's log(1 - exp(0))) would survive the mask in the gradient.
      real = pair_mask > 0
      fill = lambda x, v: jnp.where(real, x, v)
      pc, pr = fill(logps[:, first], -1.0), fill(logps[:, second], -1.0)
      nc, nr = fill(counts[:, first], 1.0), fill(counts[:, second], 1.0)
      rc, rr = (fill(ref[:, first], -1.0), fill(ref[:, second], -1.0)) if ref is not None else (
          None, None)
      loss, cr, rj = pair_losses(pc, pr, rc, rr, nc, nr, cfg)
      total = jnp.sum(loss * pair_mask)
      shown_c, shown_r = (_avg(pc, nc), _avg(pr, nr)) if spec.mean_logps else (pc, pr)
      per_pair = {'rewards/chosen': cr, 'rewards/rejected': rj,
                  'rewards/accuracies': (cr > rj).astype(jnp.float32),
                  'rewards/margins': cr - rj, 'logps/chosen': shown_c, 'logps/rejected': shown_r}
      if cfg.loss == 'orpo':
        log_odds = orpo_log_odds(pc, pr, nc, nr)
        per_pair['log_odds_ratio'] = _logsig(log_odds)
        per_pair['log_odds_chosen'] = log_odds
      for name, v in per_pair.items():
        metrics[name] = jnp.sum(jax.lax.stop_gradient(v) * pair_mask)
      tokens = lambda x, col: jnp.sum(x[:, col] * pair_mask)
      metrics['logits/chosen'] = (tokens(logit_sums, first), tokens(counts, first))
      metrics['logits/rejected'] = (tokens(logit_sums, second), tokens(counts, second))
      metrics['entropy'] = (tokens(entropy_sums, first) + tokens(entropy_sums, second),
                            tokens(counts, first) + tokens(counts, second))
      metrics['mean_token_accuracy'] = (tokens(seg_sum(stats['is_top1']), first),
                                        tokens(counts, first))
      nll_sum, nll_count = chosen_nll(mask)

    # RPO / CPO's cpo_alpha: a token mean over the batch's chosen completions, as TRL.
    nll = nll_sum / jnp.maximum(nll_count, 1.0)
    if cfg.loss == 'orpo':
      # ORPO's NLL covers the whole chosen sequence, prompt included: every position of the
      # segment predicts a token of it (TRL: labels = input_ids where attention_mask is 1).
      real = (batch['segment_ids'] > 0).astype(jnp.float32)
      o_sum, o_count = chosen_nll(real)
      total = total + n * o_sum / jnp.maximum(o_count, 1.0)
      metrics['nll_loss'] = (jax.lax.stop_gradient(o_sum), o_count)
    else:
      metrics['nll_loss'] = (jax.lax.stop_gradient(nll_sum), nll_count)
    if cfg.sft_weight:
      total = total + cfg.sft_weight * n * nll
    return losses.LossOutput(total=total, weight=n,
                             metrics={k: jax.tree.map(jax.lax.stop_gradient, v)
                                      for k, v in metrics.items()})

  return loss_fn


def derived_metrics(cfg: DPOConfig, reduced: dict) -> dict:
  """Metrics that are no mean of sums, from `losses.reduce_output`'s: KTO's rewards/margins
  (mean desirable reward - mean undesirable reward, as TRL). Other losses: unchanged."""
  if cfg.loss == 'kto':
    reduced = dict(reduced, **{'rewards/margins': reduced['rewards/chosen']
                               - reduced['rewards/rejected']})
  return reduced
