"""The reward-model loss: Bradley-Terry over the paired preference batch, as TRL's RewardTrainer.

A reward model is the Transformer with model.head='score' (one scalar per position). The reward
of a sequence is its score at its last token, the EOS after prompt + completion (transformers'
*ForSequenceClassification reads the last token that is not `pad_token_id`; see
`reward_positions`). For a pair (chosen c, rejected r) with optional margin m (Bradley & Terry
1952; the margin as in Llama 2, Touvron et al. 2023, sec. 3.2.2):

    loss = -log sigmoid(r_c - r_r - m)  +  center_coef * (r_c + r_r)^2

averaged over the pairs of the batch (the second term is TRL's `center_rewards_coefficient`,
Eisenstein et al. 2023, which keeps rewards centred on zero).

Batch (the paired contract of issue 12, `llmjax.data` format 'preference'): pair k of a row is
segment 2k+1 (prompt + chosen) and segment 2k+2 (prompt + rejected); `pair_mask` [B, P] marks
the real pairs and `margin` [B, P] is the record's margin (0 when absent). Each segment must
hold its whole sequence in `inputs`, EOS included: the score is read where the EOS is an input.

Metrics, with TRL 1.16's names (`RewardTrainer.compute_loss`): accuracy (r_c > r_r, strictly),
margin (mean of r_c - r_r, without the margin field), mean_reward (over chosen and rejected
rewards alike), min_reward and max_reward. TRL logs the min and max of each forward pass
(micro-batch) and averages those over the passes of a logging window; here they are
(min, 1) / (max, 1) (sum, count) pairs, which the step's sum over micro-batches and
`losses.reduce_output` turn into exactly that mean, with no new reduction kind.
"""

import jax
import jax.numpy as jnp

from llmjax.train.losses import LossOutput, segment_sums


def reward_positions(batch, num_segments: int, pad_id: int = -1) -> tuple[jax.Array, jax.Array]:
  """Where each segment's reward is read: its last position whose input is not `pad_id`.

  As transformers' *ForSequenceClassification (the rightmost token != pad_token_id). With a
  pad id of its own (or pad_id=-1) that is the segment's last token, its EOS; when the pad id
  is the EOS (TRL pads with EOS when the tokenizer has no pad token) it is the token before.

  Args:
    batch: segment_ids, inputs [B, T] int32 (segments 1..num_segments, 0 = padding).
  Returns: (index [B, S] int32 into T, present [B, S] bool: the segment has such a token).
  """
  seg = batch['segment_ids']
  t = seg.shape[1]
  candidate = seg[..., None] == jnp.arange(1, num_segments + 1)  # [B, T, S]
  if pad_id >= 0:
    candidate &= (batch['inputs'] != pad_id)[..., None]
  pos = jnp.arange(t, dtype=jnp.int32)[None, :, None]  # [1, T, 1]
  last = jnp.max(jnp.where(candidate, pos, -1), axis=1)  # [B, S]: a segment-wise max
  return jnp.maximum(last, 0), last >= 0


def sequence_rewards(params, batch, apply_fn, num_segments: int,
                     pad_id: int = -1) -> tuple[jax.Array, jax.Array]:
  """The reward of every segment of every row: (rewards [B, S] float32, present [B, S])."""
  scores, _ = apply_fn(params, batch['inputs'], positions=batch['positions'],
                       segment_ids=batch['segment_ids'])  # [B, T] float32
  index, present = reward_positions(batch, num_segments, pad_id)
  rewards = jnp.take_along_axis(scores.astype(jnp.float32), index, axis=1)  # [B, S]
  return jnp.where(present, rewards, 0.0), present


def bradley_terry(chosen: jax.Array, rejected: jax.Array, margin: jax.Array | None = None,
                  center_coef: float = 0.0) -> jax.Array:
  """Per-pair loss -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2, float32."""
  diff = chosen - rejected
  if margin is not None:
    diff = diff - margin
  loss = -jax.nn.log_sigmoid(diff)
  if center_coef:
    loss = loss + center_coef * jnp.square(chosen + rejected)
  return loss


def reward_loss(params, batch, apply_fn, ref_params=None, *, num_pairs: int,
                center_coef: float = 0.0, pad_id: int = -1, loss_chunk: int = 0) -> LossOutput:
  """The Bradley-Terry loss of a paired batch: sums over its real pairs (weight = their count).

  Args:
    batch: inputs/segment_ids/positions [B, T], pair_mask [B, P] and optionally margin [B, P]
      (P = num_pairs, the static pairs per row).
    ref_params: unused (a reward model has no reference); the common loss signature.
    center_coef: reward.center_coef, TRL's center_rewards_coefficient (0: off).
    pad_id: the tokenizer's pad id as TRL sets it (its pad token, else EOS), where
      transformers would not read a reward (`reward_positions`); -1: the segment's last token.
    loss_chunk: unused (no vocab-sized logits here); accepted as the trainer passes it.
  """
  del ref_params, loss_chunk
  rewards, present = sequence_rewards(params, batch, apply_fn, 2 * num_pairs, pad_id)
  chosen, rejected = rewards[:, 0::2], rewards[:, 1::2]  # [B, P]
  mask = batch['pair_mask'].astype(jnp.float32) * present[:, 0::2] * present[:, 1::2]
  margin = batch.get('margin')
  per_pair = bradley_terry(chosen, rejected,
                           None if margin is None else margin.astype(jnp.float32), center_coef)
  n = jnp.sum(mask)
  real = mask > 0
  # min/max over the chosen and rejected rewards of this pass's real pairs; (0, 0) when none.
  both = jnp.concatenate([chosen, rejected], axis=1)  # [B, 2P]
  both_real = jnp.concatenate([real, real], axis=1)
  any_real = jnp.any(real)
  lo = jnp.where(any_real, jnp.min(jnp.where(both_real, both, jnp.inf)), 0.0)
  hi = jnp.where(any_real, jnp.max(jnp.where(both_real, both, -jnp.inf)), 0.0)
  once = any_real.astype(jnp.float32)
  metrics = {
      'accuracy': jnp.sum(mask * (chosen > rejected)),
      'margin': jnp.sum(mask * (chosen - rejected)),
      'mean_reward': (jnp.sum(mask * (chosen + rejected)), 2.0 * n),
      'min_reward': (lo * once, once),
      'max_reward': (hi * once, once),
  }
  return LossOutput(total=jnp.sum(mask * per_pair), weight=n, metrics=metrics)
