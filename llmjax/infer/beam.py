"""Beam search, as transformers 5.x defines it (`GenerationMixin._beam_search`), batched over
prompts on the engine's model and KV cache.

    outs = beam.generate(cfg, params, prompts, SamplingParams(12, temperature=0.0, num_beams=4,
                         length_penalty=0.6, early_stopping=True, num_return_sequences=2),
                         eos_id=2)   # per prompt: num_return_sequences Completions, best first

Every prompt keeps K = num_beams running beams (cache rows b*K .. b*K+K-1) and K finished
hypotheses. At each step, per prompt:
  1. the running beams' next-token log-probs (float32 log-softmax, then the processors:
     repetition / presence / frequency penalty and no_repeat_ngram, as transformers applies its
     processors to the log-probs) plus each beam's running score give K * vocab candidates,
     of which the C = max(2, 1 + #EOS ids) * K best are kept (so K of them never end at EOS);
  2. a candidate that ends at EOS or reaches max_new_tokens is "done"; the K best candidates
     that are not done become the next running beams;
  3. the done candidates among the K best (and only those) are offered to the finished set with
     score = sum log-prob / generated length ** length_penalty, where the generated length
     counts the new tokens including the EOS and never the prompt (transformers 5.x:
     `cur_len + 1 - decoder_prompt_len`); the K best of finished + offered stay;
  4. the KV cache rows are gathered by the chosen beams' parents (`jnp.take` on the cache's
     batch axis, on the device) and the chosen tokens go through the model.
A prompt stops (its finished set frozen) when its best running beam cannot beat its worst
finished hypothesis (transformers' `_check_early_stop_heuristic`: the running score divided by
the current generated length ** length_penalty, or by max_new_tokens ** length_penalty for
early_stopping='never' with length_penalty > 0), when early_stopping=True and K hypotheses
have finished, or at max_new_tokens. The loop ends when every prompt has stopped; a stopped
prompt's rows keep computing (the batch shape is fixed) but can change nothing.

The constants (-1e9 for "impossible", added in transformers' order) are transformers' own, so
the top-k choices, ties included, follow the same arithmetic.

Sampling with beams (transformers' do_sample=True beam search) is refused: temperature must be 0.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.infer import engine, processors
from llmjax.infer.engine import Completion, Sampling, SamplingParams
from llmjax.models.transformer import Cache, Transformer

IMPOSSIBLE = -1.0e9  # transformers' score for a beam that must not be chosen
EARLY_STOPPING = {False: 0, True: 1, 'never': 2}  # early_stopping -> the state's int code


@flax.struct.dataclass
class BeamState:
  """B prompts with K beams each; running rows are flattened as b * K + k."""
  tokens: jax.Array  # [B*K, S] int32: running beams' prompt + output (the processors' history)
  prompt_len: jax.Array  # [B*K] int32
  step: jax.Array  # [] int32: tokens every running beam has generated so far
  max_new: jax.Array  # [] int32: max_new_tokens
  running_scores: jax.Array  # [B, K] float32: sum of (processed) log-probs, best first
  finished_out: jax.Array  # [B, K, M] int32: the finished hypotheses' generated tokens
  finished_len: jax.Array  # [B, K] int32: their generated lengths (EOS included)
  finished_scores: jax.Array  # [B, K] float32: length-penalised, best first
  finished: jax.Array  # [B, K] bool: the slot holds a finished hypothesis
  improvable: jax.Array  # [B] bool: transformers' is_early_stop_heuristic_unsatisfied
  done: jax.Array  # [B] bool: the prompt's finished set is final
  length_penalty: jax.Array  # [] float32
  early_stopping: jax.Array  # [] int32, EARLY_STOPPING's code
  sampling: Sampling  # [B*K]: the processors' per-row parameters
  eos: jax.Array  # [E] int32 padded with -1


def _running_outputs(state: BeamState, m: int) -> jax.Array:
  """The running beams' generated tokens [B*K, M] (positions >= step are meaningless)."""
  s = state.tokens.shape[1]
  pos = jnp.clip(state.prompt_len[:, None] + jnp.arange(m)[None, :], 0, s - 1)
  return jnp.take_along_axis(state.tokens, pos, axis=1)


def _gather(x, idx):
  """x [B, N, ...] at idx [B, J] along axis 1 -> [B, J, ...] (transformers' `_gather_beams`)."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def select(state: BeamState, logits, *, num_beams: int, num_candidates: int
           ) -> tuple[BeamState, jax.Array, jax.Array]:
  """One beam step on the running beams' next-token logits [B*K, vocab]: updates the scores and
  finished hypotheses. Returns (state, parent rows [B*K] of the new running beams, their new
  tokens [B*K]); the caller reorders the cache and history by the parents."""
  bk, v = logits.shape
  k, c = num_beams, num_candidates
  b = bk // k
  m = state.finished_out.shape[-1]
  sp = state.sampling
  length = state.prompt_len + state.step
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B*K, vocab]
  logp = processors.penalties(logp, state.tokens, length, state.prompt_len,
                              sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty)
  logp = processors.no_repeat_ngram(logp, state.tokens, length, sp.no_repeat_ngram_size)
  acc = (logp.reshape(b, k, v) + state.running_scores[:, :, None]).reshape(b, k * v)
  top_lp, top_idx = jax.lax.top_k(acc, c)  # [B, C], best first
  parent, tok = top_idx // v, (top_idx % v).astype(jnp.int32)  # beam within the prompt, token
  new_len = state.step + 1  # the candidates' generated length
  hits = jnp.isin(tok, state.eos) | (new_len >= state.max_new)  # [B, C] ends here

  # The K best candidates that go on (transformers' `_get_running_beams_for_next_iteration`).
  run_lp = top_lp + hits.astype(jnp.float32) * IMPOSSIBLE
  nxt = jax.lax.top_k(run_lp, k)[1]  # [B, K]
  running_scores = _gather(run_lp, nxt)
  run_parent, run_tok = _gather(parent, nxt), _gather(tok, nxt)

  # Finished hypotheses (transformers' `_update_finished_beams`): only the K best candidates
  # may finish; the others exist so that K beams go on.
  cand = _gather(_running_outputs(state, m).reshape(b, k, m), parent)  # [B, C, M]
  cand = jnp.where(jnp.arange(m)[None, None, :] == state.step, tok[:, :, None], cand)
  did = hits & (jnp.arange(c) < k)[None, :]
  score = top_lp / new_len.astype(jnp.float32) ** state.length_penalty
  full = jnp.all(state.finished, axis=-1, keepdims=True) & (state.early_stopping == 1)
  score = score + full.astype(jnp.float32) * IMPOSSIBLE
  score = score + (~state.improvable[:, None]).astype(jnp.float32) * IMPOSSIBLE
  score = score + (~did).astype(jnp.float32) * IMPOSSIBLE
  merged = jnp.concatenate([state.finished_scores, score], axis=1)  # [B, K + C]
  keep = jax.lax.top_k(merged, k)[1]  # [B, K]
  finished_scores = _gather(merged, keep)
  finished_out = _gather(jnp.concatenate([state.finished_out, cand], axis=1), keep)
  finished_len = _gather(jnp.concatenate(
      [state.finished_len, jnp.broadcast_to(new_len, (b, c)).astype(jnp.int32)], axis=1), keep)
  finished = _gather(jnp.concatenate([state.finished, did], axis=1), keep)

  # Can the best running beam still beat the worst finished one (`_check_early_stop_heuristic`,
  # evaluated at the new length)?
  best_len = jnp.where((state.early_stopping == 2) & (state.length_penalty > 0),
                       state.max_new, new_len).astype(jnp.float32)
  best = running_scores[:, :1] / best_len ** state.length_penalty  # [B, 1]
  worst = jnp.where(finished, jnp.min(finished_scores, axis=1, keepdims=True), IMPOSSIBLE)
  improvable = state.improvable & jnp.any(best > worst, axis=-1)
  done = (~improvable | (jnp.all(finished, axis=-1) & (state.early_stopping == 1))
          | (new_len >= state.max_new))
  rows = (jnp.arange(b)[:, None] * k + run_parent).reshape(bk)
  state = state.replace(step=new_len, running_scores=running_scores, finished_out=finished_out,
                        finished_len=finished_len, finished_scores=finished_scores,
                        finished=finished, improvable=improvable, done=state.done | done)
  return state, rows, run_tok.reshape(bk)


def search(params, tokens, lengths, state: BeamState, *, cfg, num_beams: int,
           num_candidates: int, cache_len: int) -> BeamState:
  """Beam search for right-padded prompts tokens [B, T] (lengths [B]) from `state` (`start`):
  one prefill of the B prompts, its cache rows repeated K times, then beam steps until every
  prompt is done. Returns the final state (finished hypotheses best first)."""
  b, t = tokens.shape
  k = num_beams
  model = Transformer(cfg)
  cache = Cache.zeros(cfg, b, cache_len).constrain()  # inside jit: made in place on the mesh
  positions = jnp.minimum(jnp.arange(t)[None, :], (lengths - 1)[:, None])  # as engine.prefill
  logits, cache = model.apply({'params': params}, tokens, positions=positions, cache=cache)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, vocab]
  # Each prompt's K beams start from its one prefill (beams 1.. score IMPOSSIBLE at first).
  cache = Cache(jnp.repeat(cache.k, k, axis=1), jnp.repeat(cache.v, k, axis=1),
                jnp.repeat(lengths, k)).constrain()
  logits = jnp.repeat(last.astype(jnp.float32), k, axis=0)  # [B*K, vocab]

  def cond(carry):
    return ~jnp.all(carry[2].done)

  def body(carry):
    cache, logits, state = carry
    step = state.step
    state, rows, tok = select(state, logits, num_beams=k, num_candidates=num_candidates)
    # Reorder on the device: each new beam takes its parent's cache rows and history.
    history = jnp.take(state.tokens, rows, axis=0)
    s = history.shape[1]
    history = history.at[jnp.arange(b * k), jnp.minimum(state.prompt_len + step, s - 1)].set(tok)
    cache = Cache(jnp.take(cache.k, rows, axis=1), jnp.take(cache.v, rows, axis=1),
                  jnp.take(cache.lengths, rows)).constrain()
    logits, cache = model.apply({'params': params}, tok[:, None], cache=cache)
    return cache, logits[:, 0].astype(jnp.float32), state.replace(tokens=history)

  _, _, state = jax.lax.while_loop(cond, body, (cache, logits, state))
  return state


jit_search = jax.jit(search, static_argnames=('cfg', 'num_beams', 'num_candidates', 'cache_len'),
                     donate_argnames=('state',))


def check(cfg, p: SamplingParams, flag: str = '--'):
  """A one-line UserError for beam settings the model cannot take (needs the vocabulary)."""
  if p.num_beams > cfg.vocab_size:
    raise UserError(f"{flag}num_beams={p.num_beams}: larger than the vocabulary"
                    f" ({cfg.vocab_size}); use fewer beams.")


def generate(cfg, params, prompts, sampling: SamplingParams, *, eos_id, bucket: int = 16
             ) -> list[list[Completion]]:
  """Beam search for each prompt with one SamplingParams (num_beams, length_penalty,
  early_stopping, num_return_sequences, max_new_tokens and the penalties; temperature 0).

  Returns per prompt its num_return_sequences best finished hypotheses, best first, as
  Completions with `score` (sum log-prob / generated length ** length_penalty, the EOS counted
  in the length) and finish_reason 'eos' (the EOS is not in ids) or 'length'. `bucket`: the
  output buffer is rounded up to it, so nearby max_new_tokens share a compiled program.
  """
  p = sampling.validate()
  check(cfg, p)
  k, r = p.num_beams, p.num_return_sequences
  n = len(prompts)
  if p.max_new_tokens == 0:
    engine.check_prompts(cfg, prompts, 0)
    return [[Completion([], 'length', score=0.0) for _ in range(r)] for _ in prompts]
  longest = engine.check_prompts(cfg, prompts, p.max_new_tokens)
  t, cache_len = engine.shapes(cfg, longest, p.max_new_tokens)
  tokens = np.zeros((n, t), np.int32)
  for i, q in enumerate(prompts):
    tokens[i, :len(q)] = q
  lengths = np.array([len(q) for q in prompts], np.int32)
  eos_ids = engine.eos_tuple(eos_id)
  num_candidates = max(2, 1 + len(eos_ids)) * k
  m = engine._round_up(p.max_new_tokens, bucket)
  history = np.zeros((n * k, cache_len), np.int32)
  history[:, :t] = np.repeat(tokens, k, axis=0)
  running = np.full((n, k), IMPOSSIBLE, np.float32)
  running[:, 0] = 0.0  # only the first beam's continuations at the first step
  state = BeamState(
      tokens=history, prompt_len=np.repeat(lengths, k), step=np.int32(0),
      max_new=np.int32(p.max_new_tokens), running_scores=running,
      finished_out=np.zeros((n, k, m), np.int32), finished_len=np.zeros((n, k), np.int32),
      finished_scores=np.full((n, k), IMPOSSIBLE, np.float32),
      finished=np.zeros((n, k), bool), improvable=np.ones((n,), bool),
      done=np.zeros((n,), bool), length_penalty=np.float32(p.length_penalty),
      early_stopping=np.int32(EARLY_STOPPING[p.early_stopping]),
      sampling=Sampling.of([p] * (n * k), [0] * (n * k), [0] * (n * k)),
      eos=engine._eos_array(eos_ids))
  state = jit_search(params, tokens, lengths, state, cfg=cfg, num_beams=k,
                     num_candidates=num_candidates, cache_len=cache_len)
  out, length, score = jax.device_get((state.finished_out, state.finished_len,
                                       state.finished_scores))
  result = []
  for i in range(n):
    row = []
    for j in range(r):
      ids = out[i, j, :length[i, j]].tolist()
      reason = 'length'
      if ids and ids[-1] in eos_ids:
        ids, reason = ids[:-1], 'eos'
      row.append(Completion(ids, reason, score=float(score[i, j])))
    result.append(row)
  return result
