"""The sampler as it was before the generation engine (commit f3e257c, `generate` path only,
kept verbatim apart from the stream functions), for `benchmarks/generate.py` to measure the
engine against side by side: one jitted program per set of sampling parameters (static), ids
only, no penalties, no log-probs. Not used by llmjax itself.
"""
import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.kernels import dispatch
from llmjax.models.config import ModelConfig
from llmjax.models.transformer import Cache, Transformer


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int = 64
  temperature: float = 1.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def sample_logits(logits: jax.Array, rng: jax.Array, p: SamplingParams) -> jax.Array:
  """logits [batch, vocab] float32 -> token ids [batch] int32."""
  if p.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / p.temperature
  neg = jnp.finfo(jnp.float32).min
  if p.top_k:
    kth = jax.lax.top_k(logits, p.top_k)[0][:, -1:]  # [batch, 1]
    logits = jnp.where(logits < kth, neg, logits)
  if p.top_p < 1.0:
    # Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    # probability mass reaches top_p; the most likely token is always kept.
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < p.top_p, axis=-1) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx[:, None], axis=-1)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _prefill(model: Transformer, params, tokens, lengths, max_len: int):
  """tokens [B, T] right-padded, lengths [B] -> (cache holding the prompts, the logits after
  each prompt's last token [B, vocab])."""
  cache = Cache.zeros(model.cfg, tokens.shape[0], max_len)
  # Padding slots repeat their row's last position, so a row's largest position is its own
  # length - 1 (dynamic RoPE sizes its base by it, as transformers does on the unpadded row).
  positions = jnp.minimum(jnp.arange(tokens.shape[1])[None, :], (lengths - 1)[:, None])
  logits, cache = model.apply({'params': params}, tokens, positions=positions, cache=cache)
  cache = cache.replace(lengths=lengths)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, vocab]
  return cache, last


def _sample(last, rng, params_: SamplingParams):
  """logits [B, vocab] -> (token ids [B], the next rng): one rng split per sampled token, in
  the same order in `_generate` and `stream`, so both draw the same tokens from one seed."""
  rng, key = jax.random.split(rng)
  return sample_logits(last, key, params_), rng


def _decode(model: Transformer, params, cache, tok):
  """tok [B] written at each row's next slot -> (cache, logits after it [B, vocab])."""
  logits, cache = model.apply({'params': params}, tok[:, None], cache=cache)
  return cache, logits[:, 0]


@functools.partial(jax.jit, static_argnames=('cfg', 'params_', 'max_len', 'eos_ids'))
def _generate(params, tokens, lengths, rng, *, cfg: ModelConfig, params_: SamplingParams,
              max_len: int, eos_ids: tuple[int, ...]):
  """tokens [B, T] right-padded, lengths [B] -> generated ids [B, max_new_tokens] (padded with
  eos_ids[0] after a sequence's first EOS)."""
  eos_id = eos_ids[0] if eos_ids else -1
  eos = jnp.asarray(eos_ids, jnp.int32)
  model = Transformer(cfg)
  batch = tokens.shape[0]
  n_new = params_.max_new_tokens
  out = jnp.full((batch, n_new), eos_id, jnp.int32)
  if n_new == 0:
    return out
  cache, last = _prefill(model, params, tokens, lengths, max_len)
  tok, rng = _sample(last, rng, params_)
  out = out.at[:, 0].set(tok)
  done = jnp.isin(tok, eos)

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < n_new) & ~jnp.all(done)

  def body(carry):
    # The last sampled token goes through the model, then the next one is sampled from its
    # logits: no forward pass is spent after the final token.
    i, cache, tok, done, out, rng = carry
    cache, last = _decode(model, params, cache, tok)
    tok, rng = _sample(last, rng, params_)
    tok = jnp.where(done, eos_id, tok)
    return i + 1, cache, tok, done | jnp.isin(tok, eos), out.at[:, i].set(tok), rng

  carry = (jnp.int32(1), cache, tok, done, out, rng)
  return jax.lax.while_loop(cond, body, carry)[4]



def _shapes(cfg: ModelConfig, longest: int, max_new_tokens: int,
            platform: str | None = None) -> tuple[int, int]:
  """(padded prompt length, cache length) for prompts of up to `longest` tokens.

  Both are rounded up so that prompts of similar lengths reuse one compiled program. The cache
  is then sized in whole blocks of the decode kernel where it runs (`dispatch.cache_length`),
  which may exceed max_seq_len: the slots past the last position are never written or read, and
  a cache of partial blocks would be copied (padded) on every decode step.
  """
  t = min(_round_up(longest, 16), cfg.max_seq_len)
  max_len = min(_round_up(t + max_new_tokens, 64), cfg.max_seq_len)
  return t, dispatch.cache_length(max_len, cfg, platform)


def _check_prompts(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int) -> int:
  """The longest prompt's length; a UserError for an empty prompt or one past the context."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("generate: every prompt needs at least one token (add a BOS token).")
  longest = max(len(p) for p in prompts)
  need = longest + max_new_tokens
  if need > cfg.max_seq_len:
    raise UserError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} ="
                    f" {need} exceeds the model context {cfg.max_seq_len}; shorten the prompt or"
                    " lower max_new_tokens.")
  return longest


def _eos_ids(eos_id: int | tuple[int, ...]) -> tuple[int, ...]:
  return tuple(sorted({int(i) for i in np.atleast_1d(eos_id) if i >= 0}))


def generate(cfg: ModelConfig, params, prompts: list[list[int]], params_: SamplingParams, *,
             eos_id: int | tuple[int, ...], seed: int = 0) -> list[list[int]]:
  """Samples a continuation for each prompt (token ids); each result stops before EOS.

  Args:
    prompts: token id lists of any lengths (>= 1).
    eos_id: the id that ends a sequence, or several (Llama 3 chat models stop at <|eot_id|>
      and <|end_of_text|>); negative ids are ignored, so -1 means no EOS.
  Returns: per prompt, the generated ids (without the prompt, without EOS).
  """
  longest = _check_prompts(cfg, prompts, params_.max_new_tokens)
  t, max_len = _shapes(cfg, longest, params_.max_new_tokens)
  tokens = np.zeros((len(prompts), t), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)
  eos_ids = _eos_ids(eos_id)
  out = np.asarray(_generate(params, jnp.asarray(tokens), jnp.asarray(lengths),
                             jax.random.key(seed), cfg=cfg, params_=params_, max_len=max_len,
                             eos_ids=eos_ids))
  results = []
  for row in out.tolist():
    ends = [i for i, tok in enumerate(row) if tok in eos_ids]
    results.append(row[:ends[0]] if ends else row)
  return results

