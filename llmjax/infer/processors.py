"""Logits processors with per-row parameters, in the order transformers applies them.

Every function takes the raw next-token logits [batch, vocab] float32 and per-row parameter
arrays [batch], so one compiled program serves any mix of requests: a row's parameters are
data, never Python constants baked into the trace. The order is transformers'
(`GenerationMixin._get_logits_processor`): repetition penalty, then `no_repeat_ngram_size`, then
(sampled rows only) temperature, top-k, top-p, min-p. OpenAI's presence/frequency penalties,
which transformers lacks, are applied next to the repetition penalty, as vLLM does.

`history` [batch, S] holds each row's prompt and output so far: positions < `length` are valid,
positions in [prompt_len, length) are the output.
"""

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def token_counts(history: jax.Array, length: jax.Array, start: jax.Array, vocab: int) -> jax.Array:
  """How often each token occurs in history[b, start_b:length_b]: [batch, vocab] int32."""
  pos = jnp.arange(history.shape[1])[None, :]  # [1, S]
  valid = (pos >= start[:, None]) & (pos < length[:, None])  # [batch, S]
  rows = jnp.arange(history.shape[0])[:, None]
  return jnp.zeros((history.shape[0], vocab), jnp.int32).at[rows, history].add(
      valid.astype(jnp.int32))


def _skip_unless(on, fn, logits, *args):
  """fn(logits, *args), or logits unchanged when no row turns the processor on: a decode step
  of greedy or plain-sampling rows then skips the [batch, vocab] scatters and sort (lax.cond
  runs one branch; both are compiled, so the row values still never recompile)."""
  return jax.lax.cond(on, fn, lambda logits, *args: logits, logits, *args)


def penalties(logits, history, length, prompt_len, repetition_penalty, presence_penalty,
              frequency_penalty):
  """`_penalties`, skipped when every row has them off."""
  on = (jnp.any(repetition_penalty != 1.0) | jnp.any(presence_penalty != 0.0)
        | jnp.any(frequency_penalty != 0.0))
  return _skip_unless(on, _penalties, logits, history, length, prompt_len, repetition_penalty,
                      presence_penalty, frequency_penalty)


def _penalties(logits, history, length, prompt_len, repetition_penalty, presence_penalty,
               frequency_penalty):
  """Repetition penalty (Keskar et al. 2019, CTRL, as transformers'
  `RepetitionPenaltyLogitsProcessor`): a logit s of a token seen in the prompt or the output is
  replaced by `s * p if s < 0 else s / p` (p = 1: off). Presence/frequency penalties as OpenAI
  defines them, on the output tokens only: `s - count * frequency - (count > 0) * presence`.

  logits [batch, vocab] float32; the penalties [batch] float32.
  """
  vocab = logits.shape[-1]
  seen = token_counts(history, length, jnp.zeros_like(length), vocab) > 0  # [batch, vocab]
  p = repetition_penalty[:, None]
  logits = jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)
  out_counts = token_counts(history, length, prompt_len, vocab).astype(jnp.float32)
  return (logits - out_counts * frequency_penalty[:, None]
          - (out_counts > 0) * presence_penalty[:, None])


def no_repeat_ngram(logits, history, length, n):
  """`_no_repeat_ngram`, skipped when every row has n = 0."""
  return _skip_unless(jnp.any(n > 0), _no_repeat_ngram, logits, history, length, n)


def _no_repeat_ngram(logits, history, length, n):
  """transformers' `NoRepeatNGramLogitsProcessor` with a per-row n (0: off): bans every token
  that would complete an n-gram already present in the row's prompt + output.

  Token history[j] is banned when the n-1 tokens before it equal the row's last n-1 tokens
  (j - n + 1 >= 0, j < length). n = 1 bans every token seen so far, as transformers does.
  A loop over the n-1 offsets (its trip count the batch's largest n, a traced value) keeps n
  out of the compiled shapes.
  """
  b, s = history.shape
  pos = jnp.arange(s)[None, :]  # [1, S]
  rows = jnp.arange(b)[:, None]

  def offset(k, match):
    # history[j - k] == history[length - k] for rows whose n - 1 >= k.
    before = jnp.take_along_axis(history, jnp.clip(pos - k, 0, s - 1), axis=1)  # [batch, S]
    last = jnp.take_along_axis(history, jnp.clip(length - k, 0, s - 1)[:, None], axis=1)
    return match & ((before == last) | (k >= n[:, None]))

  match = (n[:, None] > 0) & (pos >= n[:, None] - 1) & (pos < length[:, None])  # [batch, S]
  match = jax.lax.fori_loop(1, jnp.max(n), offset, match)
  banned = jnp.zeros(logits.shape, bool).at[rows, history].max(match)  # [batch, vocab]
  return jnp.where(banned, NEG_INF, logits)


def warp(logits, temperature, top_k, top_p, min_p):
  """`_warp`, skipped when every row is greedy."""
  # Without a sampled row `sample` takes the argmax of the unwarped logits for every row.
  return _skip_unless(jnp.any(temperature > 0), _warp, logits, temperature, top_k, top_p, min_p)


def _warp(logits, temperature, top_k, top_p, min_p):
  """Temperature, top-k, top-p, min-p (transformers' warpers, in its order) for sampled rows.

  Rows with temperature 0 (greedy) are divided by 1: they take the argmax of the logits before
  warping, which no warper changes. top_k 0, top_p 1 and min_p 0 are off. One ascending sort
  serves top-k and top-p: each warper only raises a per-row threshold below which logits go
  to -inf (transformers' rule, ties at the threshold kept as `scores < kth` keeps them).
  """
  logits = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  # Plain temperature sampling needs no sort (on a CPU the [batch, vocab] sort was a fifth of a
  # 32-row serving step): skipped unless a row truncates, which changes no value, as the
  # thresholds of rows with the warpers off keep every logit.
  truncates = jnp.any(top_k > 0) | jnp.any(top_p < 1.0) | jnp.any(min_p > 0.0)
  return _skip_unless(truncates, _truncate, logits, top_k, top_p, min_p)


def _truncate(logits, top_k, top_p, min_p):
  """top-k, top-p and min-p of temperature-scaled logits [batch, vocab] (see `_warp`)."""
  vocab = logits.shape[-1]
  asc = jnp.sort(logits, axis=-1)  # [batch, vocab] ascending
  # top-k: `scores < topk(scores, k)[-1]` removed.
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(asc, (vocab - k)[:, None], axis=-1)  # [batch, 1]
  asc = jnp.where(asc < kth, NEG_INF, asc)
  # top-p (Holtzman et al. 2020), as `TopPLogitsWarper`: ascending cumulative probability,
  # tokens with cum <= 1 - top_p removed, the most likely always kept.
  cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
  removed = (cum <= (1.0 - top_p)[:, None]) & (jnp.arange(vocab) < vocab - 1)[None, :]
  first_kept = jnp.sum(removed, axis=-1)  # removed entries are a prefix of the sorted row
  pth = jnp.take_along_axis(asc, first_kept[:, None], axis=-1)
  pth = jnp.where((top_p < 1.0)[:, None], pth, NEG_INF)
  # min-p (Nguyen et al. 2024): probs < min_p * max prob removed, i.e.
  # logit < max logit + log(min_p); log(0) = -inf keeps everything.
  mth = asc[:, -1:] + jnp.log(min_p)[:, None]
  threshold = jnp.maximum(jnp.maximum(kth, pth), mth)
  return jnp.where(logits < threshold, NEG_INF, logits)


def sample(penalised, warped, keys, greedy):
  """Penalised logits and their `warp` [batch, vocab], per-row keys [batch], greedy [batch]
  bool -> ids [batch].

  Greedy rows take the argmax of the penalised logits (transformers applies no warper when
  do_sample=False); sampled rows draw from their warped distribution with their own key, so a
  row's draw does not depend on the other rows of the batch.
  """
  ids = jax.vmap(jax.random.categorical)(keys, warped)
  return jnp.where(greedy, jnp.argmax(penalised, axis=-1), ids).astype(jnp.int32)
