"""Losses and log-probabilities, all computed in float32.

The loss contract: a loss function has the signature `loss_fn(params, batch, apply_fn) ->
LossOutput`, a set of *sums*: the numerator `total`, the normaliser `weight` (tokens,
sequences, pairs: whatever the loss averages over) and a dict of summable `metrics`. The train
step adds them over micro-batches (and the data-parallel shards, under jit) and divides once,
so any loss is exact under gradient accumulation: the update is that of `total / weight` over
the whole global batch. Pretraining and SFT use `next_token_loss` (SFT masks the prompt through
`loss_mask`); DPO, reward models and RL plug into the same step with their own loss and batch,
and get per-sequence log-probs from `sequence_logprobs`.
"""

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from llmjax.models.transformer import Transformer


@flax.struct.dataclass
class LossOutput:
  """What every loss returns; every field is a float32 sum over the batch it saw.

  total: scalar, the sum of the per-unit losses; the step differentiates total / weight.
  weight: scalar, the number of units averaged over (must not depend on the params).
  metrics: name -> scalar sum, reported divided by `weight` (a per-unit mean), or
    name -> (sum, count), reported as sum / count (a mean over other units).
  """
  total: jax.Array
  weight: jax.Array
  metrics: dict = flax.struct.field(default_factory=dict)


def zeros_like_output(out: LossOutput) -> LossOutput:
  """A LossOutput of zeros with the structure of `out` (or of its `jax.eval_shape`)."""
  return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), out)


def reduce_output(out: LossOutput) -> dict:
  """Summed LossOutput -> reported means: {'loss', 'weight', metric names...}."""
  denom = jnp.maximum(out.weight, 1e-9)
  metrics = {'loss': out.total / denom, 'weight': out.weight}
  for name, value in out.metrics.items():
    if isinstance(value, (tuple, list)):
      metrics[name] = value[0] / jnp.maximum(value[1], 1e-9)
    else:
      metrics[name] = value / denom
  return metrics


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Weighted token cross-entropy.

  Args:
    logits: [batch, length, vocab] (any float dtype; upcast to float32).
    targets: [batch, length] int token ids.
    weights: [batch, length] float; 0 excludes a position (padding, prompt tokens).
  Returns: (sum of weighted token losses, sum of weights), both float32 scalars.
  """
  token_loss = -target_logprobs(logits, targets)  # [batch, length]
  weights = weights.astype(jnp.float32)
  return jnp.sum(token_loss * weights), jnp.sum(weights)


def target_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[targets] in float32: logits [..., vocab], targets [...] -> [...]."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logit - logz


def token_logprobs(params, batch, apply_fn, loss_chunk: int = 0) -> jax.Array:
  """log p(targets[b, t] | inputs[b, :t+1]) for every position: [batch, length] float32.

  batch: inputs/targets/segment_ids/positions [batch, length] int32 (packed rows attend within
    their segment only). loss_chunk: 0 = one [batch, length, vocab] logits tensor; otherwise
    the head is applied to loss_chunk positions at a time (`chunked_logprobs`), so the float32
    logits of the whole row never exist. Same values and gradients either way.
  """
  kw = dict(positions=batch['positions'], segment_ids=batch['segment_ids'])
  if loss_chunk:
    hidden, _ = apply_fn(params, batch['inputs'], return_hidden=True, **kw)
    head = lambda x: apply_fn(params, x, method=Transformer.logits)
    return chunked_logprobs(head, hidden, batch['targets'], loss_chunk)
  logits, _ = apply_fn(params, batch['inputs'], **kw)
  return target_logprobs(logits, batch['targets'])


def chunked_logprobs(head: Callable, hidden: jax.Array, targets: jax.Array,
                     chunk: int) -> jax.Array:
  """`target_logprobs(head(hidden), targets)` without the whole logits tensor.

  With a 128k vocabulary the float32 logits of one 8192-token sequence are 4 GiB, and their
  gradient as much again: most of a long-context step's memory. Here a scan applies the head to
  `chunk` positions at a time under `jax.checkpoint`, so only one [batch, chunk, vocab] block
  lives at once, forward or backward (the backward recomputes it: one more head matmul).

  Args:
    head: x [batch, chunk, embed] -> logits [batch, chunk, vocab] (closes over the params).
    hidden: [batch, length, embed]; targets: [batch, length]; chunk divides length.
  Returns: [batch, length] float32 log-probabilities of the targets.
  """
  return _per_chunk(target_logprobs, head, hidden, targets, chunk)


def _per_chunk(fn: Callable, head: Callable, hidden: jax.Array, targets: jax.Array,
               chunk: int):
  """fn(head(hidden), targets) -> [batch, length] arrays (or a dict of them), computed `chunk`
  positions at a time by a scan under `jax.checkpoint` (the scheme of `chunked_logprobs`)."""
  b, t, _ = hidden.shape
  if t % chunk:
    raise ValueError(f"train.loss_chunk={chunk} must divide the sequence length {t}.")
  n = t // chunk
  # [batch, length, ...] -> [n, batch, chunk, ...]: the scan runs over the chunk index.
  split = lambda x: jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def one(h, y):
    return fn(head(h), y)  # each [batch, chunk]

  _, out = jax.lax.scan(lambda c, xs: (c, one(*xs)), None, (split(hidden), split(targets)))
  # [n, batch, chunk] -> [batch, length]
  return jax.tree.map(lambda v: jnp.swapaxes(v, 0, 1).reshape(b, t), out)


def logit_stats(logits: jax.Array, targets: jax.Array) -> dict:
  """Per-position statistics of the next-token distribution, all float32.

  logits [..., vocab] (any float dtype), targets [...] int -> dict of [...] arrays:
    logprobs:   log softmax(logits)[target] (differentiable, as `target_logprobs`)
    entropy:    -sum_v p_v log p_v
    mean_logit: the mean of the raw logits over the vocabulary (TRL's `logits/chosen` is its
                mean over completion tokens)
    is_top1:    1.0 where the target is the argmax (ties: the first index, as TRL), else 0.0
  Only logprobs carries a gradient: the others are for logging.
  """
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  frozen = jax.lax.stop_gradient(logits)
  logp = frozen - jax.lax.stop_gradient(logz)[..., None]
  return {
      'logprobs': target_logit - logz,
      'entropy': -jnp.sum(jnp.exp(logp) * logp, axis=-1),
      'mean_logit': jnp.mean(frozen, axis=-1),
      'is_top1': (jnp.argmax(frozen, axis=-1) == targets).astype(jnp.float32),
  }


def token_stats(params, batch, apply_fn, loss_chunk: int = 0, temperature: float = 1.0) -> dict:
  """`logit_stats` of every position of the batch: dict of [batch, length] float32 arrays.

  The log-probs equal `token_logprobs`' (values and gradients). loss_chunk as there: > 0 applies
  the head to loss_chunk positions at a time under `jax.checkpoint`, so neither the float32
  logits of the whole row nor a copy for the statistics ever exists. temperature: the
  statistics of softmax(logits / temperature), the distribution a sampler at that temperature
  draws from (RL's policy, as TRL's GRPO scores it).
  """
  kw = dict(positions=batch['positions'], segment_ids=batch['segment_ids'])
  if not loss_chunk:
    logits, _ = apply_fn(params, batch['inputs'], **kw)
    return logit_stats(_at_temperature(logits, temperature), batch['targets'])
  hidden, _ = apply_fn(params, batch['inputs'], return_hidden=True, **kw)
  return hidden_stats(params, hidden, batch['targets'], apply_fn, loss_chunk, temperature)


def _at_temperature(logits, temperature: float):
  return logits.astype(jnp.float32) / temperature if temperature != 1.0 else logits


def hidden_stats(params, hidden: jax.Array, targets: jax.Array, apply_fn, loss_chunk: int = 0,
                 temperature: float = 1.0) -> dict:
  """`token_stats` from the trunk's final-norm output hidden [B, T, embed] (for a loss that
  reads another head of the same trunk too, PPO's values): the LM head applied here, whole or
  loss_chunk positions at a time."""
  head = lambda x: _at_temperature(apply_fn(params, x, method=Transformer.logits), temperature)
  if not loss_chunk:
    return logit_stats(head(hidden), targets)
  return _per_chunk(logit_stats, head, hidden, targets, loss_chunk)


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Per-segment sums of a packed row: values [batch, length], segment_ids [batch, length]
  (1..num_segments; 0 = padding, dropped) -> [batch, num_segments], column s-1 for segment s."""
  onehot = segment_ids[..., None] == jnp.arange(1, num_segments + 1)  # [batch, length, segs]
  return jnp.einsum('bt,bts->bs', values.astype(jnp.float32), onehot.astype(jnp.float32))


def sequence_logprobs(params, batch, apply_fn, num_segments: int = 1,
                      loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Summed target log-probs of each sequence (segment) of each row, in float32.

  The building block of DPO, reward models and RL: log pi(completion | prompt) is the sum of
  the token log-probs where `loss_mask` is 1. Packed rows hold several sequences (segment ids
  1..num_segments, which never attend to each other); each gets its own sum.

  Args:
    batch: inputs/targets/segment_ids/positions/loss_mask [batch, length].
    num_segments: the most sequences a row holds (1 for unpacked rows).
    loss_chunk: as in `token_logprobs` (never the whole float32 logits when > 0).
  Returns: (logps [batch, num_segments], token counts [batch, num_segments]), float32; a
    segment that does not occur sums to 0 with count 0.
  """
  lp = token_logprobs(params, batch, apply_fn, loss_chunk)  # [batch, length]
  mask = batch['loss_mask'].astype(jnp.float32)
  seg = batch['segment_ids']
  return (segment_sums(lp * mask, seg, num_segments), segment_sums(mask, seg, num_segments))


def next_token_loss(params, batch, apply_fn, loss_chunk: int = 0,
                    router: 'RouterLoss | None' = None) -> LossOutput:
  """Next-token cross-entropy averaged over the batch's weighted target tokens.

  batch: inputs/targets/segment_ids/positions [batch, length] int32, loss_mask [batch, length].
  loss_chunk: 0 = one [batch, length, vocab] logits tensor; otherwise the head over pieces of
    loss_chunk positions (which must divide length). Same value and gradients.
  router: an MoE model's loss coefficients (`RouterLoss.from_model`): the load-balancing and
    z-losses are added (`moe_losses`) and logged. None: a dense model's plain cross-entropy.
  """
  weights = batch['loss_mask'].astype(jnp.float32)
  if router is None:
    lp = token_logprobs(params, batch, apply_fn, loss_chunk)
    return LossOutput(total=-jnp.sum(lp * weights), weight=jnp.sum(weights))
  lp, stats = token_logprobs_and_router(params, batch, apply_fn, loss_chunk)
  extra, metrics = moe_losses(stats, jnp.sum(weights, axis=1), router, batch['inputs'].size)
  return LossOutput(total=-jnp.sum(lp * weights) + extra, weight=jnp.sum(weights),
                    metrics=metrics)


# ------------------------------------------------------------------- mixture-of-experts losses

# Metrics under this prefix are per-expert and reported at evals only (the train log would get
# one column per expert every log step).
EVAL_ONLY_PREFIX = 'expert_load/'


@flax.struct.dataclass
class RouterLoss:
  """The MoE loss coefficients (model.router_aux_loss_coef, model.router_z_loss_coef) and the
  routing shape the load-balancing loss needs."""
  aux_coef: float = flax.struct.field(pytree_node=False)
  z_coef: float = flax.struct.field(pytree_node=False)
  num_experts: int = flax.struct.field(pytree_node=False)
  top_k: int = flax.struct.field(pytree_node=False)

  @classmethod
  def from_model(cls, cfg) -> 'RouterLoss | None':
    """None for a dense model."""
    if not cfg.num_experts:
      return None
    return cls(cfg.router_aux_loss_coef, cfg.router_z_loss_coef, cfg.num_experts,
               cfg.num_experts_per_tok)


def token_logprobs_and_router(params, batch, apply_fn, loss_chunk: int = 0):
  """`token_logprobs` and the MoE layers' router statistics of the same forward pass.

  The model sows a `moe.RouterStats` per MoE layer into its 'aux' collection; this applies it
  with mutable=['aux'] and returns (logprobs [batch, length] float32, `moe.router_stats` of the
  collection: stacked over the MoE layers, or None for a dense model). The statistics travel
  with the loss's value, through the loss contract, never through a global.
  """
  from llmjax.models import moe
  kw = dict(positions=batch['positions'], segment_ids=batch['segment_ids'], mutable=['aux'])
  if loss_chunk:
    (hidden, _), aux = apply_fn(params, batch['inputs'], return_hidden=True, **kw)
    head = lambda x: apply_fn(params, x, method=Transformer.logits)
    lp = chunked_logprobs(head, hidden, batch['targets'], loss_chunk)
  else:
    (logits, _), aux = apply_fn(params, batch['inputs'], **kw)
    lp = target_logprobs(logits, batch['targets'])
  return lp, moe.router_stats(aux)


def moe_losses(stats, row_weight: jax.Array, router: RouterLoss, num_tokens: int):
  """The MoE auxiliary losses as sums for a LossOutput: (extra total [], metrics).

  Load balancing (Switch Transformer eq. 4), exactly transformers' load_balancing_loss_func on
  one row: with every MoE layer's router logits of the row's valid tokens concatenated (as HF
  concatenates its per-layer tuple), f_e = the fraction of (layer, token) pairs whose top k
  includes e, P_e = the mean router probability of e, aux = num_experts * sum_e f_e P_e.
  z-loss (ST-MoE eq. 5): the mean over the same pairs of logsumexp(router logits)^2.
  Each row's values count `row_weight[b]` times (its loss tokens), so total / weight adds
  coef * (the weighted mean of the rows' aux): at batch 1 that is HF's `loss + coef * aux_loss`,
  and the sum does not depend on how rows are split into micro-batches (grad_accum).

  stats: `moe.RouterStats` stacked [moe_layers, batch, ...]; row_weight [batch];
  num_tokens: batch x length, for the dropped fraction.
  metrics: aux_loss, router_z_loss (weighted like the loss), moe_dropped (the fraction of
  token copies dropped by the capacity) and expert_load/<e> (the fraction of routed copies
  that went to expert e; 1 / num_experts when balanced).
  """
  if stats is None:
    raise ValueError("moe_losses: the model sowed no router statistics; it has no MoE layer"
                     " (model.num_experts=0).")
  denom = jnp.sum(stats.tokens, axis=0)  # [batch] (layer, valid token) pairs
  safe = jnp.maximum(denom, 1.0)
  f = jnp.sum(stats.counts, axis=0) / safe[:, None]  # [batch, experts]
  p = jnp.sum(stats.probs, axis=0) / safe[:, None]
  aux = router.num_experts * jnp.sum(f * p, axis=-1)  # [batch]
  z = jnp.sum(stats.z, axis=0) / safe  # [batch]
  w = row_weight.astype(jnp.float32)
  aux_sum, z_sum = jnp.sum(aux * w), jnp.sum(z * w)
  copies = jnp.float32(router.top_k * num_tokens * stats.dropped.shape[0])
  load = jnp.sum(stats.counts, axis=(0, 1))  # [experts]
  total_load = jnp.maximum(jnp.sum(load), 1.0)
  metrics = {'aux_loss': aux_sum, 'router_z_loss': z_sum,
             'moe_dropped': (jnp.sum(stats.dropped), copies),
             **{f'{EVAL_ONLY_PREFIX}{e}': (load[e], total_load)
                for e in range(router.num_experts)}}
  return router.aux_coef * aux_sum + router.z_coef * z_sum, metrics
