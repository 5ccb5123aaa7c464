"""The generation engine: `prefill` and `decode_step`, pure functions over an explicit KV cache
and decode state, with every sampling parameter a per-row array.

    cache = Cache.zeros(cfg, batch, max_len)
    state = DecodeState.empty(batch, max_len, vocab, eos_ids, logprobs=K)
    cache, state = jit_prefill(params, cache, tokens, slots, state, lengths, sampling, cfg=cfg)
    cache, state, ids = jit_decode_step(params, cache, state, cfg=cfg)   # one token per row

Each is compiled once per shape bucket (batch, prompt bucket, cache length, top-K log-probs,
number of EOS ids): temperature, top-k, top-p, min-p, the penalties, `no_repeat_ngram_size`,
the seed, the request id and max_new_tokens are data (`Sampling`), so changing them never
recompiles, and rows with different parameters (greedy next to sampled) share one batch.

Randomness: the token that row r samples after t earlier ones uses the key
`fold_in(fold_in(key(seed_r), request_id_r), t)`, which depends on nothing else in the batch,
so a request samples the same tokens alone or batched with any others.

Log-probs: each sampled token's log-prob (and with `logprobs=K` the K largest) are those of the
model's own distribution, the float32 log-softmax of the raw logits before any processor
(penalties, temperature, truncation) — what `llmjax.train.losses.target_logprobs` computes on
the same sequence in a forward pass, so RL can use them as the behaviour policy's log-probs
(vLLM's default `raw_logprobs` too). A token that the processors made more or less likely
still gets its model log-prob.

Slots: `prefill` writes its prompts into the cache rows `slots`, leaving the other rows as they
are, so a serving loop can refill finished rows while the others keep decoding (continuous
batching); `generate` fills every row at once.
"""

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.infer import processors
from llmjax.models.transformer import Cache, Transformer


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """One request's sampling parameters (host-side; `Sampling.of` makes the per-row arrays).

  Defaults are all off except temperature 1. Definitions: `llmjax.infer.processors`.
  """
  max_new_tokens: int = 64
  temperature: float = 1.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  min_p: float = 0.0  # 0: off
  repetition_penalty: float = 1.0  # 1: off; > 1 discourages repeats (CTRL / transformers)
  presence_penalty: float = 0.0  # OpenAI's, in [-2, 2], on output tokens
  frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2], on output tokens
  no_repeat_ngram_size: int = 0  # 0: off
  # Beam search (`llmjax.infer.beam`, transformers' definitions), for temperature 0 only:
  num_beams: int = 1  # 1: off (greedy or sampling)
  length_penalty: float = 1.0  # score = sum log-prob / generated length ** length_penalty
  early_stopping: bool | str = False  # True, False or 'never', as transformers defines them
  num_return_sequences: int = 1  # best hypotheses returned per prompt, <= num_beams

  def validate(self, prefix: str = '--') -> 'SamplingParams':
    """A one-line UserError naming the flag (`prefix` + field) for a value out of range."""
    def bad(name, why):
      raise UserError(f"{prefix}{name}={getattr(self, name)}: {why}.")
    if self.max_new_tokens < 0:
      bad('max_new_tokens', 'must be >= 0')
    if self.temperature < 0:
      bad('temperature', 'must be >= 0 (0: greedy)')
    if self.top_k < 0:
      bad('top_k', 'must be >= 0 (0: off)')
    if not 0 < self.top_p <= 1:
      bad('top_p', 'must be in (0, 1] (1: off)')
    if not 0 <= self.min_p <= 1:
      bad('min_p', 'must be in [0, 1] (0: off)')
    if self.repetition_penalty <= 0:
      bad('repetition_penalty', 'must be > 0 (1: off; > 1 penalises repeats)')
    for name in ('presence_penalty', 'frequency_penalty'):
      if not -2 <= getattr(self, name) <= 2:
        bad(name, 'must be in [-2, 2] as OpenAI defines it (0: off)')
    if self.no_repeat_ngram_size < 0:
      bad('no_repeat_ngram_size', 'must be >= 0 (0: off)')
    if self.num_beams < 1:
      bad('num_beams', 'must be >= 1 (1: no beam search)')
    if self.num_beams > 1 and self.temperature > 0:
      raise UserError(f"{prefix}num_beams={self.num_beams} with {prefix}temperature="
                      f"{self.temperature}: beam search does not sample; set {prefix}temperature=0.")
    if self.early_stopping not in (True, False, 'never'):
      bad('early_stopping', "must be true, false or 'never'")
    if not 1 <= self.num_return_sequences <= self.num_beams:
      bad('num_return_sequences', f'must be in [1, num_beams={self.num_beams}]')
    return self


def parse_early_stopping(value, name: str = '--early_stopping'):
  """true / false / never (text or bool) -> True, False or 'never', transformers' values; a
  one-line UserError naming `name` otherwise."""
  if isinstance(value, bool):
    return value
  choice = {'true': True, 'false': False, 'never': 'never'}.get(str(value).lower())
  if choice is None:
    raise UserError(f"{name}={value}: expected true, false or never.")
  return choice


@flax.struct.dataclass
class Sampling:
  """Per-row sampling parameters, each [batch]."""
  temperature: jax.Array  # float32
  top_k: jax.Array  # int32
  top_p: jax.Array  # float32
  min_p: jax.Array  # float32
  repetition_penalty: jax.Array  # float32
  presence_penalty: jax.Array  # float32
  frequency_penalty: jax.Array  # float32
  no_repeat_ngram_size: jax.Array  # int32
  max_new_tokens: jax.Array  # int32
  seed: jax.Array  # uint32
  request_id: jax.Array  # int32

  @classmethod
  def of(cls, params: Sequence[SamplingParams], seeds: Sequence[int],
         request_ids: Sequence[int]) -> 'Sampling':
    f32 = lambda name: np.array([getattr(p, name) for p in params], np.float32)
    i32 = lambda name: np.array([getattr(p, name) for p in params], np.int32)
    return cls(f32('temperature'), i32('top_k'), f32('top_p'), f32('min_p'),
               f32('repetition_penalty'), f32('presence_penalty'), f32('frequency_penalty'),
               i32('no_repeat_ngram_size'), i32('max_new_tokens'),
               np.array([s % 2**32 for s in seeds], np.uint32), np.array(request_ids, np.int32))


@flax.struct.dataclass
class DecodeState:
  """Everything a decode step needs besides params and cache; rows are independent requests.

  tokens[b, :length[b]] is row b's prompt and output so far; the cache holds all but the last
  of them (the last sampled token goes through the model at the next step).
  """
  tokens: jax.Array  # [batch, S] int32
  length: jax.Array  # [batch] int32
  prompt_len: jax.Array  # [batch] int32
  done: jax.Array  # [batch] bool: EOS sampled, max_new_tokens reached, stopped, or a free slot
  sampling: Sampling
  eos: jax.Array  # [E] int32, padded with -1 (`_eos_array`)
  logprob: jax.Array  # [batch, S] float32: the model log-prob of tokens[b, j] (outputs only)
  top_ids: jax.Array  # [batch, S, K] int32: the K most likely tokens at output position j
  top_logprobs: jax.Array  # [batch, S, K] float32

  @classmethod
  def empty(cls, batch: int, max_len: int, eos_ids: Sequence[int], logprobs: int = 0):
    """`batch` free rows (done) of `max_len` slots; `logprobs`: K top log-probs kept."""
    z = lambda dtype: np.zeros((batch,), dtype)
    sampling = Sampling.of([SamplingParams(max_new_tokens=0)] * batch, [0] * batch, [0] * batch)
    return cls(np.zeros((batch, max_len), np.int32), z(np.int32), z(np.int32),
               np.ones((batch,), bool), sampling, _eos_array(eos_ids),
               np.zeros((batch, max_len), np.float32),
               np.zeros((batch, max_len, logprobs), np.int32),
               np.zeros((batch, max_len, logprobs), np.float32))


def _eos_array(eos_ids: Sequence[int]) -> np.ndarray:
  """EOS ids padded with -1 to a multiple of 8, so that one, two or three EOS ids (Llama 3
  chat models have two) share one compiled program."""
  ids = list(eos_ids)
  return np.array(ids + [-1] * (-(-max(len(ids), 1) // 8) * 8 - len(ids)), np.int32)


def _rows(tree, idx):
  return jax.tree.map(lambda x: x[idx], tree)


def _next_token(logits, history, length, prompt_len, sp: Sampling, num_top: int):
  """Raw logits [n, vocab] of the rows' next token -> (ids, model log-probs [n], top-K ids and
  log-probs [n, K])."""
  logits = logits.astype(jnp.float32)
  logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [n, vocab]
  x = processors.penalties(logits, history, length, prompt_len, sp.repetition_penalty,
                           sp.presence_penalty, sp.frequency_penalty)
  x = processors.no_repeat_ngram(x, history, length, sp.no_repeat_ngram_size)
  warped = processors.warp(x, sp.temperature, sp.top_k, sp.top_p, sp.min_p)
  step = length - prompt_len  # tokens this row sampled before
  keys = jax.vmap(lambda s, r, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), t))(
      sp.seed, sp.request_id, step)
  ids = processors.sample(x, warped, keys, sp.temperature == 0)
  lp = jnp.take_along_axis(logp, ids[:, None], axis=-1)[:, 0]
  top_lp, top_ids = jax.lax.top_k(logp, num_top) if num_top else (
      jnp.zeros((ids.shape[0], 0), jnp.float32), jnp.zeros((ids.shape[0], 0), jnp.int32))
  return ids, lp, top_ids.astype(jnp.int32), top_lp


def _append(state: DecodeState, rows, ids, lp, top_ids, top_lp, write) -> DecodeState:
  """Writes token ids [n] (and log-probs) of state rows `rows` [n] at their next position,
  for rows with `write` [n]; updates length and done."""
  s = state.tokens.shape[1]
  length = state.length[rows]
  pos = jnp.where(write, length, s)  # out of bounds: dropped
  new_length = length + write
  sp = _rows(state.sampling, rows)
  finished = jnp.isin(ids, state.eos) | (new_length - state.prompt_len[rows] >= sp.max_new_tokens)
  return state.replace(
      tokens=state.tokens.at[rows, pos].set(ids, mode='drop'),
      length=state.length.at[rows].set(new_length),
      done=state.done.at[rows].set(state.done[rows] | (write & finished)),
      logprob=state.logprob.at[rows, pos].set(lp, mode='drop'),
      top_ids=state.top_ids.at[rows, pos].set(top_ids, mode='drop'),
      top_logprobs=state.top_logprobs.at[rows, pos].set(top_lp, mode='drop'))


def prefill(params, cache: Cache, tokens, slots, state: DecodeState, lengths, sampling: Sampling,
            *, cfg) -> tuple[Cache, DecodeState]:
  """Starts requests in rows `slots` [n] of the cache and state: runs their right-padded
  prompts tokens [n, T] (lengths [n]) through the model and samples each one's first token
  with its `sampling` [n] row. Other rows are left as they are. Returns (cache, state)."""
  n, t = tokens.shape
  s = cache.k.shape[2]
  model = Transformer(cfg)
  # The rows' old contents are masked out: the prompt fills slots [0, T), later ones are past
  # each row's length.
  sub = Cache(cache.k[:, slots], cache.v[:, slots], jnp.zeros((n,), jnp.int32))
  # Padding slots repeat their row's last position, so a row's largest position is its own
  # length - 1 (dynamic RoPE sizes its base by it, as transformers does on the unpadded row).
  positions = jnp.minimum(jnp.arange(t)[None, :], (lengths - 1)[:, None])
  logits, sub = model.apply({'params': params}, tokens, positions=positions, cache=sub)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [n, vocab]
  cache = Cache(cache.k.at[:, slots].set(sub.k), cache.v.at[:, slots].set(sub.v),
                cache.lengths.at[slots].set(lengths)).constrain()
  prompt = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], tokens, 0)
  history = jnp.zeros((n, s), jnp.int32).at[:, :t].set(prompt)
  state = state.replace(
      tokens=state.tokens.at[slots].set(history), length=state.length.at[slots].set(lengths),
      prompt_len=state.prompt_len.at[slots].set(lengths),
      done=state.done.at[slots].set(sampling.max_new_tokens <= 0),
      sampling=jax.tree.map(lambda a, b: a.at[slots].set(b), state.sampling, sampling))
  out = _next_token(last, history, lengths, lengths, sampling, state.top_ids.shape[-1])
  return cache, _append(state, slots, *out, sampling.max_new_tokens > 0)


def decode_step(params, cache: Cache, state: DecodeState, *, cfg, kv_span: int | None = None
                ) -> tuple[Cache, DecodeState, jax.Array]:
  """One token for every row that is not done: its last token goes through the model, the next
  is sampled. Returns (cache, state, ids [batch]) (ids of done rows are meaningless).

  The state may have fewer rows than the cache (cache.lengths then has the state's rows): the
  step runs in the cache's first rows and leaves the others alone; kv_span (static) bounds the
  cache slots read, as `Transformer` says (no row's length may reach past it)."""
  b = state.tokens.shape[0]
  rows = jnp.arange(b)
  last = jnp.take_along_axis(state.tokens, (state.length - 1)[:, None], axis=1)  # [batch, 1]
  logits, new = Transformer(cfg).apply({'params': params}, last, cache=cache, kv_span=kv_span)
  active = ~state.done
  # A finished row's cache does not grow (what the step wrote at its length is never read).
  cache = Cache(new.k, new.v, jnp.where(active, new.lengths, cache.lengths)).constrain()
  ids, lp, top_ids, top_lp = _next_token(logits[:, 0], state.tokens, state.length,
                                         state.prompt_len, state.sampling,
                                         state.top_ids.shape[-1])
  return cache, _append(state, rows, ids, lp, top_ids, top_lp, active), ids


def decode_loop(params, cache: Cache, state: DecodeState, num_steps, *, cfg):
  """Up to `num_steps` (a traced int) decode steps, ending early once every row is done."""
  def cond(carry):
    i, _, state = carry
    return (i < num_steps) & ~jnp.all(state.done)

  def body(carry):
    i, cache, state = carry
    cache, state, _ = decode_step(params, cache, state, cfg=cfg)
    return i + 1, cache, state

  _, cache, state = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, state))
  return cache, state


# Donated: each call updates the cache and state in place instead of holding two copies.
jit_prefill = jax.jit(prefill, static_argnames=('cfg',), donate_argnames=('cache', 'state'))
jit_decode_step = jax.jit(decode_step, static_argnames=('cfg',),
                          donate_argnames=('cache', 'state'))
jit_decode_loop = jax.jit(decode_loop, static_argnames=('cfg',),
                          donate_argnames=('cache', 'state'))


# ----------------------------------------------------------------------------- host driver

@dataclasses.dataclass
class Completion:
  """One request's output. ids exclude the prompt and EOS; with a stop string they end at the
  token that completed it (the caller cuts the text before it, `cut_at_stop`).
  logprobs[i]: the model log-prob of ids[i]; top_logprobs[i]: [(id, log-prob)] * K, most
  likely first (both None unless asked for)."""
  ids: list[int]
  finish_reason: str  # 'eos' | 'length' | 'stop'
  logprobs: list[float] | None = None
  top_logprobs: list[list[tuple[int, float]]] | None = None
  score: float | None = None  # beam search only: sum log-prob / length ** length_penalty


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def shapes(cfg, longest: int, max_new_tokens: int, platform: str | None = None) -> tuple[int, int]:
  """(padded prompt length, cache length) for prompts of up to `longest` tokens.

  Both are rounded up so that prompts of similar lengths reuse one compiled program. The cache
  is then sized in whole blocks of the decode kernel where it runs (`dispatch.cache_length`),
  which may exceed max_seq_len: the slots past the last position are never written or read, and
  a cache of partial blocks would be copied (padded) on every decode step.
  """
  from llmjax.kernels import dispatch
  t = min(_round_up(longest, 16), cfg.max_seq_len)
  max_len = min(_round_up(t + max_new_tokens, 64), cfg.max_seq_len)
  return t, dispatch.cache_length(max_len, cfg, platform)


def new_cache(cfg, batch: int, max_len: int) -> Cache:
  """An empty cache, laid out on the context mesh (`jax.set_mesh`) by the active logical
  rules (`transformer.CACHE_AXES`) when there is one: made in place on the devices, never
  whole on one of them."""
  if jax.sharding.get_abstract_mesh().empty:
    return Cache.zeros(cfg, batch, max_len)
  return _sharded_zeros(cfg, batch, max_len)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sharded_zeros(cfg, batch: int, max_len: int) -> Cache:
  return Cache.zeros(cfg, batch, max_len).constrain()


def check_prompts(cfg, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
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


def eos_tuple(eos_id) -> tuple[int, ...]:
  return tuple(sorted({int(i) for i in np.atleast_1d(eos_id) if i >= 0}))


def check_stop(stop: Sequence[str], flag: str = '--stop') -> list[str]:
  if any(s == '' for s in stop):
    raise UserError(f"{flag}: a stop string is empty; pass a non-empty string or drop the flag.")
  return list(stop)


def _start(cfg, params, prompts, sampling, seeds, request_ids, eos_id, logprobs):
  """Validates, sizes, allocates and prefills: (cache, state, eos ids)."""
  n = len(prompts)
  sampling = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
  seeds = [seeds] * n if isinstance(seeds, int) else list(seeds)
  request_ids = list(range(n)) if request_ids is None else list(request_ids)
  if not len(sampling) == len(seeds) == len(request_ids) == n:
    raise ValueError("one SamplingParams, seed and request id per prompt (or one for all)")
  for p in sampling:
    p.validate()
  if logprobs < 0:
    raise UserError(f"--logprobs={logprobs}: must be >= 0 (0: only the sampled token's).")
  if logprobs > cfg.vocab_size:
    raise UserError(f"--logprobs={logprobs}: larger than the vocabulary ({cfg.vocab_size}).")
  max_new = max(p.max_new_tokens for p in sampling)
  longest = check_prompts(cfg, prompts, max_new)
  t, max_len = shapes(cfg, longest, max_new)
  tokens = np.zeros((n, t), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)
  eos_ids = eos_tuple(eos_id)
  cache = new_cache(cfg, n, max_len)
  state = DecodeState.empty(n, max_len, eos_ids, logprobs)
  cache, state = jit_prefill(params, cache, tokens, np.arange(n, dtype=np.int32), state,
                             lengths, Sampling.of(sampling, seeds, request_ids), cfg=cfg)
  return cache, state, eos_ids, max_new


def _first_stop(ids: list[int], decode, stop, checked: int) -> int | None:
  """The length of the shortest prefix of ids (longer than `checked`, whose text had none)
  whose decoded text contains a stop string; None when the whole has none."""
  if not any(s in decode(ids) for s in stop):
    return None
  for k in range(checked + 1, len(ids) + 1):
    if any(s in decode(ids[:k]) for s in stop):
      return k
  return len(ids)


def generate(cfg, params, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams | Sequence[SamplingParams], *, eos_id, seeds=0,
             request_ids: Sequence[int] | None = None, logprobs: int | None = None,
             stop: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
             chunk: int = 16) -> list[Completion]:
  """Continues each prompt; per prompt its own SamplingParams, seed and request id (default:
  its index), or one of each for all.

  Args:
    eos_id: the id that ends a sequence, or several; negative ids are ignored.
    logprobs: None: none returned; 0: each token's model log-prob; K: also the top K.
    stop: stop strings, checked on the host every `chunk` decode steps on the text `decode`
      gives for a row's ids: a row stops at the first token whose text contains one.

  With num_beams > 1 (one SamplingParams for all prompts; no stop strings or log-probs):
  beam search (`llmjax.infer.beam.generate`), and the result holds num_return_sequences
  Completions per prompt, best first, prompt after prompt (transformers' order), each with its
  `score`.
  """
  stop = check_stop(stop)
  beams = [p.num_beams > 1 for p in ([sampling] if isinstance(sampling, SamplingParams)
                                     else sampling)]
  if any(beams):
    from llmjax.infer import beam
    if not isinstance(sampling, SamplingParams):
      if len(set(sampling)) > 1:
        raise UserError("beam search takes one SamplingParams for all prompts.")
      sampling = sampling[0]
    if stop or logprobs is not None:
      raise UserError("beam search returns no log-probs and takes no stop strings; drop"
                      " --logprobs / --stop or use --num_beams=1.")
    return [c for row in beam.generate(cfg, params, prompts, sampling, eos_id=eos_id)
            for c in row]
  if stop and decode is None:
    raise ValueError("stop strings need `decode` (ids -> text)")
  cache, state, eos_ids, max_new = _start(cfg, params, prompts, sampling, seeds, request_ids,
                                          eos_id, logprobs or 0)
  n = len(prompts)
  stopped: dict[int, int] = {}  # row -> ids kept
  checked = [0] * n
  steps = 1  # tokens sampled so far (the prefill's)
  while True:
    if stop:
      tokens, length, plen, done = jax.device_get(
          (state.tokens, state.length, state.prompt_len, state.done))
      newly = []
      for r in range(n):
        if r in stopped:
          continue
        ids = [i for i in tokens[r, plen[r]:length[r]].tolist()]
        if ids and ids[-1] in eos_ids:
          ids = ids[:-1]
        k = _first_stop(ids, decode, stop, checked[r])
        checked[r] = len(ids)
        if k is not None:
          stopped[r] = k
          newly.append(r)
      if newly:
        state = state.replace(done=state.done.at[np.array(newly)].set(True))
      if all(done[r] or r in stopped for r in range(n)):
        break
    if steps >= max_new or bool(jnp.all(state.done)):
      break
    todo = min(chunk, max_new - steps) if stop else max_new - steps
    cache, state = jit_decode_loop(params, cache, state, np.int32(todo), cfg=cfg)
    steps += todo
  tokens, length, plen, lp, top_ids, top_lp = jax.device_get(
      (state.tokens, state.length, state.prompt_len, state.logprob, state.top_ids,
       state.top_logprobs))
  out = []
  for r in range(n):
    a, b = int(plen[r]), int(length[r])
    ids = tokens[r, a:b].tolist()
    reason = 'length'
    if ids and ids[-1] in eos_ids:
      ids, reason = ids[:-1], 'eos'
    if r in stopped:
      ids, reason = ids[:stopped[r]], 'stop'
    c = Completion(ids, reason)
    if logprobs is not None:
      c.logprobs = lp[r, a:a + len(ids)].tolist()
      c.top_logprobs = [list(zip(i, l)) for i, l in
                        zip(top_ids[r, a:a + len(ids)].tolist(), top_lp[r, a:a + len(ids)].tolist())]
    out.append(c)
  return out


def stream(cfg, params, prompt_ids: Sequence[int], sampling: SamplingParams, *, eos_id,
           seed: int = 0, request_id: int = 0) -> Iterator[int]:
  """Yields one prompt's continuation token by token, each id as soon as it is sampled: the
  same prefill and `decode_step` as `generate` (so the same tokens for the same seed and
  request id), one jitted step per token called from Python. Stops before the first EOS id
  (not yielded) or after max_new_tokens; closing the generator early stops decoding."""
  if sampling.num_beams > 1:
    raise UserError("streaming decodes one sequence; beam search (num_beams > 1) cannot stream.")
  if sampling.max_new_tokens == 0:
    sampling.validate()
    check_prompts(cfg, [prompt_ids], 0)
    return
  cache, state, eos_ids, _ = _start(cfg, params, [list(prompt_ids)], sampling, seed,
                                    [request_id], eos_id, 0)
  for i in range(sampling.max_new_tokens):
    if i:
      cache, state, _ = jit_decode_step(params, cache, state, cfg=cfg)
    token = int(state.tokens[0, state.length[0] - 1])  # waits for this token only
    if token in eos_ids:
      return
    yield token
