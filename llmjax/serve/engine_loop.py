"""The serving engine loop: one thread owns the device and runs continuous batching over a fixed
number of KV-cache slots with the generation engine's `prefill` and `decode_step`.

    engine = EngineLoop(cfg, params, eos_ids=(2,), decode=tokenizer.decode, max_batch=32)
    engine.start()
    engine.submit([Sequence(prompt_ids, SamplingParams(...), seed=0, request_id=0,
                            stop=[], logprobs=None, emit=callback)])   # QueueFull past max_queue

Each loop iteration (vLLM's scheduler step, simplified):
  1. take new sequences and cancellations from the inbox (blocking only when idle);
  2. free the slots of cancelled sequences;
  3. admit waiting sequences into free slots (a long prompt: chunked, step 3b): prompts are right-padded to a bucket length
     (powers of two from 16), sequences of one bucket are prefilled PREFILL_BATCH at a time
     (padding rows write a scratch row), so prefills compile twice per bucket whatever the
     prompts; their first tokens are emitted at once;
  3b. one chunk of the oldest chunked prefill;
  4. one `decode_step` for the slots in use (the lowest ones: a new sequence takes the lowest
     free slot, and the step runs the first 1, 2, 4, ... rows that cover them and the first
     64, 128, ... cache positions that cover the longest, so its cost follows the load and the
     lengths; finished rows among them are computed but not written);
     each active sequence's new token is emitted, and a sequence that sampled EOS, reached its
     max_new_tokens, completed a stop string or was cancelled frees its slot before the next step.

Sampling parameters, seeds and request ids are per-row data of the one compiled step
(`llmjax.infer.engine.Sampling`), so requests with any parameters share the batch, and a
sequence's token t is drawn with `fold_in(fold_in(key(seed), request_id), t)`: the same tokens
whatever else runs and whichever slot it lands in.

The HTTP side never touches the device: `submit` and `cancel` only put items in a queue, and
each step's Deltas leave this thread in one `deliver` call (the API layer's hands them to its
event loop), or through each sequence's `emit` without one.

A prompt longer than `prefill_chunk` is prefilled one chunk per iteration between decode
steps (`_prefill_chunk`: positions [0, L - 1) of its row), and its last token goes through the
first decode step, which samples its first output token (`_begin`).

Prefix caching (`prefix_caching`): each slot remembers the prompt tokens whose keys and values
its cache row holds (`cached`), and keeps them after its sequence ends, until the slot is
reused. A new sequence takes the free slot whose cached tokens share its longest prefix, in
whole blocks of PREFIX_BLOCK tokens (at least one, and short of its last token, which the
first decode step runs): the row's first `shared` entries are kept and only positions
[shared, L - 1) are prefilled (`_prefill_chunk`, as chunked prefill does), then `_begin`. A
position's keys and values depend only on the tokens up to it, so the kept entries are what
a prefill of the whole prompt writes there (up to float rounding, as chunked prefill). Off for
dynamic RoPE, whose keys depend on the whole prompt's length. Not done: copying a prefix from a
busy slot's row (a hit needs a free slot that held it).
"""

import dataclasses
import functools
import logging
import queue
import threading
import time
from typing import Callable, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.infer import engine
from llmjax.infer.engine import DecodeState, Sampling, SamplingParams
from llmjax.models.transformer import Transformer

log = logging.getLogger('llmjax.serve')

MIN_BUCKET = 16  # the shortest padded prompt (as `engine.shapes` rounds up to 16)
# Prefix caching reuses whole blocks of this many tokens (vLLM's default block size): a shorter
# match saves less than the call it costs.
PREFIX_BLOCK = 16


class QueueFull(Exception):
  """More sequences wait than --max_queue allows; the client should retry later (503)."""


@dataclasses.dataclass
class Delta:
  """What one sequence gained since its last Delta: `ids` (sampled tokens, EOS excluded),
  `text` (new printable text: a character still incomplete or a text that may begin a stop
  string is held back), their model log-probs and top-K [(id, log-prob)] when asked for, and
  on its last Delta the finish reason: 'eos' | 'length' | 'stop' | 'cancelled'."""
  ids: list[int]
  text: str
  logprobs: list[float] | None = None
  top_logprobs: list[list[tuple[int, float]]] | None = None
  finish_reason: str | None = None
  sampled: int = 0  # tokens sampled so far, EOS included (usage's completion_tokens)


@dataclasses.dataclass(eq=False)
class Sequence:
  """One sequence to generate (one choice of an API request)."""
  prompt: list[int]
  sampling: SamplingParams  # max_new_tokens included
  seed: int
  request_id: int  # folded into the sampling key with the seed (the choice's index)
  stop: list[str]
  logprobs: int | None  # None: none; 0: each token's; K: also the top K
  emit: Callable[[Delta], None]  # called on the engine thread (unless the loop has `deliver`)
  ignore_eos: bool = False  # run to max_new_tokens (benchmarks: fixed output lengths)
  cancelled: bool = False
  # Filled by the engine loop:
  arrival: float = 0.0
  first_token: float | None = None
  last_token: float | None = None
  ids: list[int] = dataclasses.field(default_factory=list)  # sampled, EOS excluded
  sampled: int = 0
  text: str = ''  # decoded ids (cut at a stop string once one appears)
  sent: int = 0  # characters of `text` emitted
  chunked: int = -1  # >= 0: prompt positions written so far by chunked prefill (not decoding yet)


def bucket(n: int, cap: int) -> int:
  """The padded length of an n-token prompt: the next power of two >= 16, at most `cap`."""
  b = MIN_BUCKET
  while b < n:
    b *= 2
  return min(b, cap)


def shared_prefix(cached: Seq[int], prompt: Seq[int]) -> int:
  """How many of `prompt`'s first tokens a cache row holding `cached` can keep: their common
  prefix in whole PREFIX_BLOCKs, short of the prompt's last token (which must go through the
  model to sample the first output); 0 below one block."""
  n = 0
  limit = min(len(cached), len(prompt) - 1)
  while n < limit and cached[n] == prompt[n]:
    n += 1
  return n // PREFIX_BLOCK * PREFIX_BLOCK


def _pow2(n: int) -> int:
  return 1 << (n - 1).bit_length()


# Prompts of one bucket are prefilled 8 at a time, a lone one by itself: two compiles per
# bucket. (Every power of two up to --max_batch would compile six per bucket for little gain:
# a padded row costs what a real one does.)
PREFILL_BATCH = 8


def held_back(text: str, stops: Seq[str]) -> int:
  """How many characters at the end of `text` may begin a stop string (not emitted yet)."""
  held = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), held, -1):
      if text.endswith(s[:k]):
        held = k
        break
  return held


def _latest(state: DecodeState):
  """Each row's last token, its log-prob and top-K, done and output length: [rows] each
  ([rows, K] for the top-K), the little the host reads after each step."""
  rows = jnp.arange(state.tokens.shape[0])
  pos = jnp.maximum(state.length - 1, 0)
  return (state.tokens[rows, pos], state.logprob[rows, pos], state.top_ids[rows, pos],
          state.top_logprobs[rows, pos], state.done, state.length - state.prompt_len)


_jit_latest = jax.jit(_latest)


@functools.partial(jax.jit, static_argnames=('cfg', 'rows', 'span'),
                   donate_argnames=('cache', 'state'))
def _decode_rows(params, cache, state: DecodeState, *, cfg, rows: int, span: int):
  """`engine.decode_step` on the first `rows` rows and the first `span` cache positions only
  (the other rows are free slots; no active row reaches past `span`): a step's work follows
  the load and the sequences' lengths, not --max_batch and the context. On a CPU the step is
  bound by reading the KV cache, so this is most of serving's throughput. Rows are independent
  in the step, and positions past a row's length are masked, so each row's token is what the
  whole-cache step gives it. The model writes each row's new entries into the donated cache in
  place and reads only the rows and span in use, so nothing of the cache is copied. Also
  returns `_latest`."""
  eos = state.eos  # [E]: not per row
  no_eos = lambda n: jnp.zeros((n,), eos.dtype)
  sub_state = jax.tree.map(lambda x: x[:rows], state.replace(eos=no_eos(state.tokens.shape[0])))
  sub_cache = type(cache)(cache.k, cache.v, cache.lengths[:rows])
  new, sub_state, _ = engine.decode_step(params, sub_cache, sub_state.replace(eos=eos), cfg=cfg,
                                         kv_span=span)
  # dynamic_update_slice at a constant offset: XLA updates the donated buffer in place (a
  # scatter, which `.at[:rows].set` lowers to, would copy it).
  put = lambda full, part: jax.lax.dynamic_update_slice(full, part, (0,) * full.ndim)
  cache = type(cache)(new.k, new.v, put(cache.lengths, new.lengths))
  state = jax.tree.map(put,
                       state.replace(eos=no_eos(state.tokens.shape[0])),
                       sub_state.replace(eos=no_eos(rows)))
  state = state.replace(eos=eos)
  return cache, state, _latest(state)  # read by the host: one program per step, not two


def row_bucket(n: int, max_batch: int) -> int:
  """The rows a decode step runs for slots [0, n) in use: the next power of two, at most
  max_batch (one compile per bucket)."""
  return min(_pow2(n), max_batch)


MIN_SPAN = 64


def span_bucket(n: int, cache_len: int) -> int:
  """The cache positions a decode step reads for sequences of up to n tokens: the next power
  of two >= 64, at most the cache's length (one compile per bucket)."""
  return min(max(_pow2(n), MIN_SPAN), cache_len)


@functools.partial(jax.jit, static_argnames=('cfg',), donate_argnames=('cache',))
def _prefill_chunk(params, cache, tokens, row, start, end, *, cfg):
  """Chunked prefill: writes the keys and values of prompt positions [start, end) of cache row
  `row` (tokens [1, C], right-padded past end - start); the row's cache length becomes `end`.
  Nothing is sampled: the prompt's last token goes through the model at the row's first decode
  step (`_begin`), which samples the first output token as `engine.prefill` would (its key:
  step 0)."""
  c = tokens.shape[1]
  sub = type(cache)(cache.k[:, row][:, None], cache.v[:, row][:, None], start[None])
  # Padding repeats the chunk's last position, as `engine.prefill` pads.
  positions = jnp.minimum(start + jnp.arange(c), end - 1)[None]  # [1, C]
  _, sub = Transformer(cfg).apply({'params': params}, tokens, positions=positions, cache=sub)
  return type(cache)(cache.k.at[:, row].set(sub.k[:, 0]), cache.v.at[:, row].set(sub.v[:, 0]),
                     cache.lengths.at[row].set(end))


@functools.partial(jax.jit, donate_argnames=('state',))
def _begin(state: DecodeState, row, prompt, length, sampling: Sampling) -> DecodeState:
  """Row `row` of the state as `engine.prefill` leaves it, minus the first sampled token: its
  prompt [S] of `length` tokens, whose last one the next decode step runs and samples after
  (the cache holds the other length - 1, written by `_prefill_chunk`)."""
  return state.replace(
      tokens=state.tokens.at[row].set(prompt), length=state.length.at[row].set(length),
      prompt_len=state.prompt_len.at[row].set(length), done=state.done.at[row].set(False),
      sampling=jax.tree.map(lambda a, b: a.at[row].set(b[0]), state.sampling, sampling))


@jax.jit
def _mark_done(state: DecodeState, rows) -> DecodeState:
  """Rows [B] bool become done (a stop string or a cancel ended them on the host)."""
  return state.replace(done=state.done | rows)


class EngineLoop:
  """Continuous batching over `max_batch` slots; see the module docstring.

  Args:
    cfg, params: the model.
    eos_ids: ids that end a sequence.
    decode: ids -> text (the tokenizer's), or None for a model without a tokenizer (no text, no
      stop strings).
    max_batch: KV-cache slots, i.e. sequences decoded at once.
    max_queue: sequences that may wait for a slot; `submit` raises QueueFull past it.
    max_len: the context (prompt + output) of one sequence; the cache holds that many per slot.
    max_logprobs: the largest top-K log-probs a request may ask for (computed at every step).
    metrics: a `llmjax.serve.metrics.Metrics` or None.
    deliver: called on the engine thread with every [(Sequence, Delta)] of a step at once
      (the HTTP side wakes its event loop once per step, not once per sequence); None: each
      sequence's `emit`.
    warmup_all: `warmup()` compiles every bucket (else the smallest ones only).
    prefill_chunk: prompts longer than this are prefilled this many tokens per loop iteration,
      between decode steps, so that a long prompt does not stall the running sequences for its
      whole prefill; 0: off.
    prefix_caching: reuse a free slot's cached prompt prefix (module docstring); forced off for
      dynamic RoPE.
  """

  def __init__(self, cfg, params, *, eos_ids: Seq[int], decode: Callable[[list[int]], str] | None,
               max_batch: int = 32, max_queue: int = 256, max_len: int = 0,
               max_logprobs: int = 20, metrics=None, warmup_all: bool = False,
               deliver: Callable[[list], None] | None = None, prefill_chunk: int = 512,
               prefix_caching: bool = False):
    self.cfg, self.params, self.decode = cfg, params, decode
    self.eos_ids = engine.eos_tuple(list(eos_ids))
    self.max_batch, self.max_queue = max_batch, max_queue
    self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
    self.max_logprobs = min(max_logprobs, cfg.vocab_size)
    self.metrics = metrics
    self.warmup_all = warmup_all  # what `warmup()` compiles by default
    self.deliver = deliver
    self.prefill_chunk = prefill_chunk  # 0: every prompt in one prefill call
    self.chunking: list[int] = []  # slots whose prompts are being prefilled chunk by chunk
    # Dynamic RoPE rescales every key by the prompt's length: a prefix's keys are not reusable.
    self.prefix_caching = prefix_caching and cfg.rope_scaling != 'dynamic'
    self.cached: list[list[int]] = [[] for _ in range(max_batch)]  # slot -> tokens its row holds
    from llmjax.kernels import dispatch
    cache_len = dispatch.cache_length(self.max_len, cfg)  # whole decode-kernel blocks
    # One more row than slots: a scratch row that the padding rows of a prefill batch write
    # into (duplicate indices there are harmless: nobody reads that row).
    self.scratch = max_batch
    # Committed to the device from the start, as every step's outputs are, so that `warmup`
    # compiles the very programs the loop runs (uncommitted inputs key programs of their own).
    self.cache, self.state = jax.device_put(
        (engine.new_cache(cfg, max_batch + 1, cache_len),
         # No EOS ids on the device: `_emit_new` checks them (a request may ignore EOS).
         DecodeState.empty(max_batch + 1, cache_len, (), self.max_logprobs)),
        jax.devices()[0])
    self.slots: list[Sequence | None] = [None] * max_batch
    self.waiting: list[Sequence] = []
    self.inbox: queue.Queue = queue.Queue()
    self.lock = threading.Lock()
    self.num_waiting = 0  # submitted, not yet in a slot (read by the HTTP side for back-pressure)
    self.num_running = 0
    self.peak_running = 0  # the most sequences decoded at once (tests, benchmarks)
    self.stopping = False
    self.thread = threading.Thread(target=self._run, name='llmjax-engine', daemon=True)
    self.error: BaseException | None = None

  # ------------------------------------------------------------------ HTTP side (any thread)

  def start(self) -> 'EngineLoop':
    self.thread.start()
    return self

  def warmup(self, full: bool | None = None) -> None:
    """Compiles before serving, so that no request waits for a compile: the decode step and
    the shortest prompt bucket's prefill, or with `full` every decode (rows, span) bucket and
    every prefill (batch, prompt) bucket. Runs prompts in the scratch row and steps over free
    rows, which change no slot. Call before `start`."""
    full = self.warmup_all if full is None else full
    cache_len = self.cache.k.shape[2]
    buckets = sorted({bucket(n, self.max_len) for n in range(1, self.max_len + 1)})
    for t in (buckets if full else buckets[:1]):
      for n in ((1, PREFILL_BATCH) if full else (1,)):
        self.cache, self.state = engine.jit_prefill(
            self.params, self.cache, np.zeros((n, t), np.int32),
            np.full((n,), self.scratch, np.int32), self.state, np.ones((n,), np.int32),
            Sampling.of([SamplingParams(max_new_tokens=0)] * n, [0] * n, [0] * n), cfg=self.cfg)
    rows = sorted({row_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})
    spans = sorted({span_bucket(n, cache_len) for n in range(1, cache_len + 1)})
    if full:
      log.info('compiling %d prefill and %d decode programs before serving (--warmup=false:'
               ' each on first use instead)', 2 * len(buckets), len(rows) * len(spans))
    for r in (rows if full else rows[:1]):
      for span in (spans if full else spans[:1]):
        self.cache, self.state, latest = _decode_rows(self.params, self.cache, self.state,
                                                      cfg=self.cfg, rows=r, span=span)
    chunks = set()
    if self.prefill_chunk and self.max_len > self.prefill_chunk:
      chunks.add(self.prefill_chunk)
    if self.prefix_caching:  # a hit prefills its rest in a prompt bucket
      chunks |= {b for b in buckets if b <= (self.prefill_chunk or self.max_len)}
    if full and chunks:
      scratch = np.int32(self.scratch)
      for c in sorted(chunks):
        self.cache = _prefill_chunk(self.params, self.cache, np.zeros((1, c), np.int32), scratch,
                                    np.int32(0), np.int32(1), cfg=self.cfg)
      self.state = _begin(self.state, scratch, np.zeros((self.state.tokens.shape[1],), np.int32),
                          np.int32(1), Sampling.of([SamplingParams()], [0], [0]))
      self.state = _mark_done(self.state, np.arange(self.max_batch + 1) == self.scratch)
    jax.block_until_ready((latest, _jit_latest(self.state)))

  def alive(self) -> bool:
    return self.thread.is_alive() and self.error is None

  def submit(self, seqs: Seq[Sequence]) -> None:
    """Queues sequences (all or none); QueueFull when more than max_queue would wait for a
    slot (those that a free slot takes at once do not count)."""
    with self.lock:
      if self.stopping:
        raise QueueFull('the server is shutting down')
      free = self.max_batch - self.num_running
      if self.num_waiting + len(seqs) - free > self.max_queue:
        raise QueueFull(f'{self.num_waiting} requests wait for one of {self.max_batch} slots'
                        f' (--max_queue={self.max_queue})')
      self.num_waiting += len(seqs)
    now = time.monotonic()
    for s in seqs:
      s.arrival = now
      self.inbox.put(s)

  def cancel(self, seqs: Seq[Sequence]) -> None:
    """Ends sequences early (a client went away); their slots are freed at the next step."""
    for s in seqs:
      s.cancelled = True
    self.inbox.put(None)  # wakes an idle loop

  def stop(self, timeout: float | None = None) -> None:
    """Finishes every queued and running sequence, then ends the thread (SIGTERM's drain)."""
    with self.lock:
      self.stopping = True
    self.inbox.put(None)
    self.thread.join(timeout)

  # ------------------------------------------------------------------ engine thread

  def _run(self):
    try:
      while True:
        busy = any(self.slots) or self.waiting
        if self.stopping and not busy and self.inbox.empty():
          return
        self._take_inbox(block=not busy)
        self._retire_cancelled()
        self._admit()
        self._chunk()
        if any(s is not None and s.chunked < 0 for s in self.slots):
          self._decode()
    except BaseException as e:  # the server's /health reports it; requests in flight end
      self.error = e
      log.exception('engine loop failed')
      self._deliver([(s, Delta([], '', finish_reason='error'))
                     for s in [s for s in self.slots if s] + self.waiting])
      raise

  def _take_inbox(self, block: bool):
    items = [self.inbox.get()] if block else []
    while True:
      try:
        items.append(self.inbox.get_nowait())
      except queue.Empty:
        break
    self.waiting += [s for s in items if s is not None]

  def _retire_cancelled(self):
    done = np.zeros((self.max_batch + 1,), bool)
    for i, s in enumerate(self.slots):
      if s is not None and s.cancelled:
        done[i] = True
        self._finish(i, 'cancelled')
    if done.any():
      self.state = _mark_done(self.state, done)
    for s in [s for s in self.waiting if s.cancelled]:
      self.waiting.remove(s)
      with self.lock:
        self.num_waiting -= 1
      self._deliver([(s, Delta([], '', finish_reason='cancelled'))])
      self._count_finish(s, 'cancelled')

  def _admit(self):
    free = [i for i, s in enumerate(self.slots) if s is None]
    take, self.waiting = self.waiting[:len(free)], self.waiting[len(free):]
    if not take:
      return
    with self.lock:
      self.num_waiting -= len(take)
      self.num_running += len(take)
      self.peak_running = max(self.peak_running, self.num_running)
    groups: dict[int, list[tuple[int, Sequence]]] = {}
    for slot, s, shared in self._place(free, take):
      self.slots[slot] = s
      if shared:
        self._count_prefix(s, shared)
        self._resume(slot, s, shared)
        continue
      self._count_prefix(s, 0)
      if self.prefill_chunk and len(s.prompt) > self.prefill_chunk:
        s.chunked = 0  # its row stays done (skipped by decode steps) until `_begin`
        self.chunking.append(slot)
        self.cached[slot] = s.prompt[:-1]  # the last token's entries: its first decode step's
        continue
      self.cached[slot] = list(s.prompt)
      groups.setdefault(bucket(len(s.prompt), self.max_len), []).append((slot, s))
    for t, group in sorted(groups.items()):
      for i in range(0, len(group), PREFILL_BATCH):
        self._prefill(t, group[i:i + PREFILL_BATCH])
    self._emit_new([slot for group in groups.values() for slot, _ in group])

  def _place(self, free: list[int], take: list[Sequence]):
    """(slot, sequence, shared prefix tokens) for each sequence taken: with prefix caching the
    free slot whose cached tokens share its longest prefix (`shared_prefix`, 0: none), the
    others the lowest free slots left."""
    if not self.prefix_caching:
      return [(slot, s, 0) for slot, s in zip(free, take)]
    free, out, misses = list(free), [], []
    for s in take:
      best, slot = max(((shared_prefix(self.cached[f], s.prompt), f) for f in free),
                       key=lambda x: (x[0], -x[1]))
      if best:
        free.remove(slot)
        out.append((slot, s, best))
      else:
        misses.append(s)
    return out + [(slot, s, 0) for slot, s in zip(free, misses)]

  def _resume(self, slot: int, s: Sequence, shared: int):
    """A prefix-cache hit: keeps the row's first `shared` entries and prefills the rest of the
    prompt but its last token (in one call of a prompt bucket's length, or chunk by chunk when
    longer than prefill_chunk), then `_begin`s the row."""
    s.chunked = shared
    self.cached[slot] = s.prompt[:-1]
    rest = len(s.prompt) - 1 - shared
    if self.prefill_chunk and rest > self.prefill_chunk:
      self.chunking.append(slot)
      return
    self._chunk(slot, bucket(max(rest, 1), self.max_len))

  def _count_prefix(self, s: Sequence, shared: int):
    if self.metrics is not None and self.prefix_caching:
      self.metrics.prefix_cache(len(s.prompt), shared)

  def _chunk(self, slot: int | None = None, c: int = 0):
    """One chunk of the oldest chunked prefill (or of `slot`'s, `c` tokens long: default
    prefill_chunk); after its last, the row starts decoding."""
    if slot is None:
      if not self.chunking:
        return
      slot = self.chunking[0]
    s = self.slots[slot]
    c, start = c or self.prefill_chunk, s.chunked
    end = min(start + c, len(s.prompt) - 1)  # the last token: the first decode step's
    tokens = np.zeros((1, c), np.int32)
    tokens[0, :end - start] = s.prompt[start:end]
    self.cache = _prefill_chunk(self.params, self.cache, tokens, np.int32(slot), np.int32(start),
                                np.int32(end), cfg=self.cfg)
    s.chunked = end
    if end == len(s.prompt) - 1:
      prompt = np.zeros((self.state.tokens.shape[1],), np.int32)
      prompt[:len(s.prompt)] = s.prompt
      self.state = _begin(self.state, np.int32(slot), prompt, np.int32(len(s.prompt)),
                          Sampling.of([s.sampling], [s.seed], [s.request_id]))
      s.chunked = -1
      if slot in self.chunking:
        self.chunking.remove(slot)

  def _prefill(self, t: int, group: list[tuple[int, Sequence]]):
    n = 1 if len(group) == 1 else PREFILL_BATCH
    tokens = np.zeros((n, t), np.int32)
    lengths = np.ones((n,), np.int32)
    slots = np.full((n,), self.scratch, np.int32)
    params = [SamplingParams(max_new_tokens=0)] * n
    seeds, rids = [0] * n, [0] * n
    for j, (slot, s) in enumerate(group):
      tokens[j, :len(s.prompt)] = s.prompt
      lengths[j], slots[j] = len(s.prompt), slot
      params[j], seeds[j], rids[j] = s.sampling, s.seed, s.request_id
    self.cache, self.state = engine.jit_prefill(
        self.params, self.cache, tokens, slots, self.state, lengths,
        Sampling.of(params, seeds, rids), cfg=self.cfg)

  def _decode(self):
    active = [i for i, s in enumerate(self.slots) if s is not None and s.chunked < 0]
    rows = row_bucket(active[-1] + 1, self.max_batch)  # new sequences take the lowest free slots
    # This step writes each row's last token at position length - 1 (prompt + sampled - 1),
    # and (unread) at cache position `chunked` of a row being chunk-prefilled: the span covers
    # both, or the clamped write would land on that row's prompt.
    longest = max([len(self.slots[i].prompt) + self.slots[i].sampled for i in active]
                  + [self.slots[i].chunked + 1 for i in self.chunking if i < rows])
    span = span_bucket(longest, self.cache.k.shape[2])
    start = time.perf_counter()
    self.cache, self.state, latest = _decode_rows(self.params, self.cache, self.state,
                                                  cfg=self.cfg, rows=rows, span=span)
    jax.block_until_ready(latest)
    ran = time.perf_counter()
    self._emit_new(active, latest)
    if self.metrics is not None:
      self.metrics.step(ran - start, time.perf_counter() - ran, len(active))

  def _emit_new(self, rows: list[int], latest=None):
    """Reads the rows' latest tokens (`latest`: `_latest` of the state, computed by the step),
    hands each sequence its Delta (all of them in one `deliver` call) and frees the slots of
    finished ones. EOS is checked here, not on the device (whose state has no EOS ids), so a
    request may ignore it; no step is lost, since the host reads every step before the next."""
    latest = _jit_latest(self.state) if latest is None else latest
    ids, lp, top_ids, top_lp, done, out_len = jax.device_get(latest)
    now = time.monotonic()
    ended = np.zeros((self.max_batch + 1,), bool)
    out = []
    for r in rows:
      s = self.slots[r]
      if out_len[r] <= s.sampled:  # nothing new (max_new_tokens=0 cannot happen: checked)
        continue
      s.sampled += 1
      s.first_token = s.first_token or now
      s.last_token = now
      token = int(ids[r])
      eos = token in self.eos_ids and not s.ignore_eos
      reason = 'eos' if eos else 'length' if done[r] else None
      new_ids, new_lp, new_top = [], [], []
      if not eos:
        new_ids, new_lp = [token], [float(lp[r])]
        new_top = [list(zip(top_ids[r].tolist(), top_lp[r].tolist()))]
        s.ids.append(token)
      text, stop_hit = self._text(s, final=reason is not None)
      if stop_hit:
        reason = 'stop'
      ended[r] = reason is not None and not done[r]
      want = s.logprobs is not None
      out.append((s, Delta(new_ids, text, new_lp if want else None,
                           [row[:s.logprobs] for row in new_top] if want else None, reason,
                           s.sampled)))
      if reason:
        self._finish(r, reason, emitted=True)
    if ended.any():
      self.state = _mark_done(self.state, ended)
    self._deliver(out)

  def _deliver(self, items: list[tuple['Sequence', Delta]]):
    if not items:
      return
    if self.deliver is not None:
      self.deliver(items)
    else:
      for s, d in items:
        s.emit(d)

  def _text(self, s: Sequence, final: bool) -> tuple[str, bool]:
    """New text of `s` to emit and whether a stop string appeared (the text is cut before it);
    `final`: the sequence ends here, so nothing is held back."""
    if self.decode is None:
      return '', False
    text = self.decode(s.ids)
    cut = min((i for i in (text.find(x) for x in s.stop) if i != -1), default=-1)
    stop_hit = cut != -1
    s.text = text[:cut] if stop_hit else text
    end = len(s.text)
    if not (stop_hit or final):
      # A trailing U+FFFD is a character whose bytes are not all sampled yet.
      end = len(s.text.rstrip('\ufffd'))
      end -= held_back(s.text[:end], s.stop)
    if end <= s.sent:
      return '', stop_hit
    out, s.sent = s.text[s.sent:end], end
    return out, stop_hit

  def _finish(self, slot: int, reason: str, emitted: bool = False):
    """Frees `slot`; sends the sequence its last Delta unless `emitted` already did."""
    s = self.slots[slot]
    self.slots[slot] = None
    if s.chunked >= 0:  # cancelled mid-prefill: the row holds the positions written so far
      self.cached[slot] = s.prompt[:s.chunked]
    if slot in self.chunking:
      self.chunking.remove(slot)
    with self.lock:
      self.num_running -= 1
    if not emitted:
      self._deliver([(s, Delta([], '', finish_reason=reason, sampled=s.sampled))])
    self._count_finish(s, reason)

  def _count_finish(self, s: Sequence, reason: str):
    if self.metrics is not None:
      self.metrics.finished(s, reason)
