"""KV-cache sampling, the interface the CLIs, the trainer's samples and the eval harness use:
`generate` (a batch of prompts -> ids) and `stream` (one prompt, token by token, for chat), both
thin wrappers over the engine (`llmjax.infer.engine`: `prefill` and `decode_step`, sampling
parameters as per-row arrays, one compile per shape bucket).

Prompts of different lengths share a batch: sequence b's prompt fills cache slots
[0, len_b), and each decode step writes at slot `lengths[b]` (= its next position), so no
sequence ever attends to another's padding. EOS per sequence (decoding stops when every
sequence is done); stop strings are cut on the host (`cut_at_stop`), or checked while decoding
by `engine.generate(stop=...)`.
"""

from typing import Iterator

import jax
import jax.numpy as jnp

from llmjax.infer import engine, processors
from llmjax.infer.engine import SamplingParams
from llmjax.models.config import ModelConfig
from llmjax.models.transformer import Cache

__all__ = ['SamplingParams', 'generate', 'stream', 'cut_at_stop', 'sample_logits', 'Cache']

_shapes = engine.shapes


def sample_logits(logits: jax.Array, rng: jax.Array, p: SamplingParams) -> jax.Array:
  """logits [batch, vocab] float32 -> token ids [batch] int32: `p`'s temperature, top-k, top-p
  and min-p (no history: no penalties), every row drawn with `rng`."""
  b = logits.shape[0]
  full = lambda v, dtype=jnp.float32: jnp.full((b,), v, dtype)
  warped = processors.warp(logits.astype(jnp.float32), full(p.temperature), full(p.top_k, jnp.int32),
                           full(p.top_p), full(p.min_p))
  if p.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, warped, axis=-1).astype(jnp.int32)


def sample_params(sample) -> SamplingParams:
  """config.sample (max_new_tokens, temperature, ... as SamplingParams names them; missing
  keys keep their defaults) -> validated SamplingParams; a ConfigError names the key."""
  import dataclasses
  from llmjax.errors import ConfigError, UserError
  try:
    kwargs = {f.name: sample[f.name] for f in dataclasses.fields(SamplingParams)
              if f.name in sample}
    if 'early_stopping' in kwargs:
      kwargs['early_stopping'] = engine.parse_early_stopping(kwargs['early_stopping'],
                                                             'sample.early_stopping')
    return SamplingParams(**kwargs).validate(prefix='sample.')
  except UserError as e:
    raise ConfigError(str(e)) from None


def generate(cfg: ModelConfig, params, prompts: list[list[int]], params_: SamplingParams, *,
             eos_id: int | tuple[int, ...], seed: int = 0) -> list[list[int]]:
  """Samples a continuation for each prompt (token ids); each result stops before EOS.

  Args:
    prompts: token id lists of any lengths (>= 1).
    params_: one SamplingParams for every prompt, or a list of one per prompt.
    eos_id: the id that ends a sequence, or several (Llama 3 chat models stop at <|eot_id|>
      and <|end_of_text|>); negative ids are ignored, so -1 means no EOS.
    seed: row b samples with `fold_in(fold_in(key(seed), b), step)`.
  Returns: per prompt, the generated ids (without the prompt, without EOS).
  """
  n_new = (params_.max_new_tokens if isinstance(params_, SamplingParams)
           else max(p.max_new_tokens for p in params_))
  if n_new == 0:
    engine.check_prompts(cfg, prompts, 0)
    return [[] for _ in prompts]
  outs = engine.generate(cfg, params, prompts, params_, eos_id=eos_id, seeds=seed)
  # Beam search returns num_return_sequences per prompt, best first: keep the best.
  return [c.ids for c in outs[::len(outs) // len(prompts)]]


def stream(cfg: ModelConfig, params, prompt_ids: list[int], params_: SamplingParams, *,
           eos_id: int | tuple[int, ...], seed: int = 0) -> Iterator[int]:
  """Yields the continuation of one prompt token by token, each id as soon as it is sampled.

  The same engine as `generate` (prefill, cache slots, positions, cache size, rng keys), run
  one jitted step per token from Python instead of inside a while_loop, so that the caller sees
  each token before the next is computed: `list(stream(...)) == generate(...)[0]` for the same
  arguments and seed, greedy or sampled (bit for bit on CPU, where the tests check it; another
  backend may fuse the step and the loop body differently, which can only flip a near-tie
  token). The prefill compiles once per padded prompt length and the step once per cache
  length, never per token or per sampling parameter. Stops before the first EOS id (not
  yielded) or after max_new_tokens; closing the generator early (a stop string) stops decoding.
  """
  return engine.stream(cfg, params, prompt_ids, params_, eos_id=eos_id, seed=seed)


def cut_at_stop(text: str, stop: list[str]) -> str:
  """Truncates `text` before the first occurrence of any stop string."""
  cut = len(text)
  for s in stop:
    i = text.find(s)
    if s and i != -1:
      cut = min(cut, i)
  return text[:cut]
