"""The OpenAI-compatible HTTP layer (FastAPI): it parses and checks requests, tokenizes them as
`llmjax.generate` does, hands sequences to the engine loop and turns its Deltas into
OpenAI's response objects or server-sent events. It never touches the device.

    POST /v1/completions        prompt: text, [text], [ids] or [[ids]]; BOS added to text
    POST /v1/chat/completions   messages rendered with the model's chat template
    GET  /v1/models, /health, /metrics (Prometheus), / (the chat page)

Both POST endpoints take OpenAI's fields (`max_tokens`, `temperature`, `top_p`, `stop`, `seed`,
`n`, `logprobs`, `top_logprobs`, `presence_penalty`, `frequency_penalty`, `stream`,
`stream_options.include_usage`) and vLLM's extras (`top_k`, `min_p`, `repetition_penalty`,
`no_repeat_ngram_size`, `ignore_eos`). Unknown fields are ignored with a log line; a field that is known but
not supported here with a value that would change the output (`echo`, `logit_bias`, `tools`,
...) is a 400 rather than silently dropped. Errors are OpenAI's objects:
{"error": {"message", "type", "param", "code"}}.

finish_reason: 'stop' (EOS or a stop string), 'length' (max_tokens). usage.completion_tokens
counts every sampled token, EOS included (as vLLM counts it); usage.prompt_tokens counts each
prompt once, whatever `n`.
"""

import asyncio
import contextlib
import dataclasses
import importlib.resources
import json
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator

import fastapi
from fastapi import responses

from llmjax.errors import UserError
from llmjax.infer.engine import SamplingParams
from llmjax.serve import metrics as metrics_lib
from llmjax.serve.engine_loop import Delta, EngineLoop, QueueFull, Sequence

log = logging.getLogger('llmjax.serve')

_COMMON = {'model', 'max_tokens', 'temperature', 'top_p', 'top_k', 'min_p', 'stop', 'seed', 'n',
           'repetition_penalty', 'presence_penalty', 'frequency_penalty', 'no_repeat_ngram_size',
           'ignore_eos', 'stream', 'stream_options', 'user', 'logprobs'}
# Known fields whose non-default values this server cannot honour: refused, never dropped.
_UNSUPPORTED = {'echo': (None, False), 'best_of': (None, 1), 'logit_bias': (None, {}),
                'suffix': (None, ''), 'tools': (None, []), 'functions': (None, []),
                'response_format': (None, {'type': 'text'})}
COMPLETION_FIELDS = _COMMON | {'prompt'} | set(_UNSUPPORTED)
CHAT_FIELDS = _COMMON | {'messages', 'top_logprobs', 'max_completion_tokens', 'tool_choice',
                         'parallel_tool_calls'} | set(_UNSUPPORTED)
_FINISH = {'eos': 'stop', 'stop': 'stop', 'length': 'length', 'cancelled': 'abort',
           'error': 'error'}


class ApiError(Exception):
  """An OpenAI-style error response."""

  def __init__(self, status: int, message: str, param: str | None = None,
               kind: str = 'invalid_request_error', code: str | None = None, headers=None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
    self.headers = headers

  def response(self) -> responses.JSONResponse:
    body = {'error': {'message': self.message, 'type': self.kind, 'param': self.param,
                      'code': self.code}}
    return responses.JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclasses.dataclass
class Served:
  """What the app serves: the engine loop, the tokenizer (None: ids only), the chat template
  (None: `no_chat` says why), the model's name and context."""
  engine: EngineLoop
  tokenizer: Any
  template: Any
  name: str
  no_chat: str = ''
  end_of_turn: str = ''  # the template's (`ChatTemplate.end_of_turn`), a stop string for chats
  metrics: metrics_lib.Metrics | None = None

  @property
  def max_len(self) -> int:
    return self.engine.max_len


# ----------------------------------------------------------------------------- request fields

def _bad(message: str, param: str | None = None) -> ApiError:
  return ApiError(400, message, param)


def _get(body: dict, name: str, kinds: tuple, default=None, what: str = ''):
  """body[name] if it is of one of `kinds` (bool is never a number), else a 400."""
  value = body.get(name, default)
  if value is None:
    return default
  numeric = any(k in (int, float) for k in kinds)
  if not isinstance(value, kinds) or (numeric and isinstance(value, bool)):
    raise _bad(f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)};"
               f" got {json.dumps(value)}.", name)
  return value


def check_fields(body: dict, known: set[str], endpoint: str) -> None:
  """Logs unknown fields (clients send extras) and refuses unsupported ones that are set."""
  unknown = sorted(set(body) - known)
  if unknown:
    log.info('%s: ignoring unknown fields %s', endpoint, ', '.join(unknown))
  for name, defaults in _UNSUPPORTED.items():
    if name in body and body[name] not in defaults:
      raise _bad(f"'{name}' is not supported by this server; drop it.", name)


def sampling_of(body: dict, max_tokens: int) -> SamplingParams:
  """The request's SamplingParams; out-of-range values are a 400 naming the field."""
  f = lambda name, default: _get(body, name, (int, float), default, 'a number')
  i = lambda name, default: _get(body, name, (int,), default, 'an integer')
  p = SamplingParams(
      max_new_tokens=max_tokens, temperature=float(f('temperature', 1.0)),
      top_k=i('top_k', 0), top_p=float(f('top_p', 1.0)), min_p=float(f('min_p', 0.0)),
      repetition_penalty=float(f('repetition_penalty', 1.0)),
      presence_penalty=float(f('presence_penalty', 0.0)),
      frequency_penalty=float(f('frequency_penalty', 0.0)),
      no_repeat_ngram_size=i('no_repeat_ngram_size', 0))
  if p.top_k == -1:  # vLLM's spelling of "off"
    p = dataclasses.replace(p, top_k=0)
  try:
    return p.validate(prefix='')
  except UserError as e:
    raise _bad(str(e), str(e).split('=', 1)[0]) from None


def stops_of(body: dict) -> list[str]:
  stop = body.get('stop')
  if stop is None:
    return []
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
    raise _bad("'stop' must be a non-empty string or a list of them.", 'stop')
  return stop


def check_lengths(served: Served, prompts: list[list[int]], max_tokens: int | None,
                  default: int | None) -> int:
  """max_new_tokens for these prompts: `max_tokens`, else `default` (None: up to the context);
  a 400 for an empty prompt, one past the context, or max_tokens that do not fit."""
  if max_tokens is not None and max_tokens < 1:
    raise _bad(f"max_tokens={max_tokens}: must be >= 1.", 'max_tokens')
  ctx = served.max_len
  longest = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) == 0:
    raise _bad("the prompt is empty: it needs at least one token.", 'prompt')
  if longest >= ctx:
    raise _bad(f"the prompt is {longest} tokens; this model's context is {ctx} tokens, which"
               " must hold the prompt and at least one new token. Shorten the prompt.", 'prompt')
  if max_tokens is None:
    return min(default or ctx, ctx - longest)
  if longest + max_tokens > ctx:
    raise _bad(f"max_tokens={max_tokens} with a prompt of {longest} tokens is {longest + max_tokens}"
               f" tokens, past this model's context of {ctx}; lower max_tokens to at most"
               f" {ctx - longest}.", 'max_tokens')
  return max_tokens


def text_prompt_ids(tokenizer, text: str) -> list[int]:
  """A text prompt's ids exactly as `llmjax.generate --prompt` makes them: BOS (when the
  tokenizer has one) and the text's tokens."""
  bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else []
  return bos + tokenizer.encode(text)


def completion_prompts(served: Served, body: dict) -> list[list[int]]:
  """`prompt` as a text, texts, token ids or lists of ids -> one id list per prompt."""
  prompt = body.get('prompt')
  vocab = served.engine.cfg.vocab_size
  is_ids = lambda x: isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                  for i in x)
  if isinstance(prompt, str):
    prompt = [prompt]
  elif is_ids(prompt) and prompt:
    prompt = [prompt]
  if not isinstance(prompt, list) or not prompt or not all(
      isinstance(p, str) or is_ids(p) for p in prompt):
    raise _bad("'prompt' must be a string, a list of strings, a list of token ids or a list of"
               " lists of token ids.", 'prompt')
  out = []
  for p in prompt:
    if isinstance(p, str):
      if served.tokenizer is None:
        raise _bad("this model has no tokenizer; send the prompt as token ids.", 'prompt')
      out.append(text_prompt_ids(served.tokenizer, p))
    else:
      bad = [i for i in p if not 0 <= i < vocab]
      if bad:
        raise _bad(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab}).", 'prompt')
      out.append(list(p))
  return out


def chat_prompt(served: Served, body: dict) -> list[int]:
  """`messages` rendered with the chat template (its assistant header last)."""
  if served.template is None:
    raise _bad(f"this model cannot chat ({served.no_chat}); use /v1/completions.",
               'messages')
  messages = body.get('messages')
  if not isinstance(messages, list) or not messages:
    raise _bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects.",
               'messages')
  out = []
  for m in messages:
    if not isinstance(m, dict) or not isinstance(m.get('role'), str):
      raise _bad("each message needs a 'role' string and a 'content'.", 'messages')
    content = m.get('content')
    if isinstance(content, list):  # OpenAI's content parts: text parts only
      if not all(isinstance(c, dict) and c.get('type') == 'text' and isinstance(c.get('text'), str)
                 for c in content):
        raise _bad("message content parts must be {\"type\": \"text\", \"text\": ...}; this"
                   " server takes text only.", 'messages')
      content = ''.join(c['text'] for c in content)
    if not isinstance(content, str):
      raise _bad("each message's 'content' must be a string or a list of text parts.",
                 'messages')
    out.append({'role': m['role'], 'content': content})
  try:
    return served.template.prompt_ids(out)
  except UserError as e:
    raise _bad(str(e), 'messages') from None


# ----------------------------------------------------------------------------- running

@dataclasses.dataclass
class Job:
  """A checked request: its prompts and, per choice, the sequence settings."""
  prompts: list[list[int]]
  n: int
  sampling: SamplingParams
  seed: int
  stop: list[str]
  logprobs: int | None
  include_usage: bool
  ignore_eos: bool = False


def job_of(served: Served, body: dict, prompts: list[list[int]], *, logprobs: int | None,
           default_max: int | None, extra_stop: list[str] = ()) -> Job:
  max_tokens = _get(body, 'max_tokens', (int,), None, 'an integer')
  if 'max_completion_tokens' in body and body['max_completion_tokens'] is not None:
    max_tokens = _get(body, 'max_completion_tokens', (int,), None, 'an integer')
  max_new = check_lengths(served, prompts, max_tokens, default_max)
  sampling = sampling_of(body, max_new)
  n = _get(body, 'n', (int,), 1, 'an integer')
  if not 1 <= n <= served.engine.max_batch:
    raise _bad(f"n={n}: must be in [1, {served.engine.max_batch}] (the server's --max_batch).",
               'n')
  seed = _get(body, 'seed', (int,), None, 'an integer')
  seed = secrets.randbits(32) if seed is None else seed
  stop = stops_of(body) + [s for s in extra_stop if s]
  if stop and served.tokenizer is None:
    raise _bad("'stop' needs text, and this model has no tokenizer.", 'stop')
  options = _get(body, 'stream_options', (dict,), {}, 'an object')
  ignore_eos = _get(body, 'ignore_eos', (bool,), False, 'true or false')
  return Job(prompts, n, sampling, seed, stop, logprobs, bool(options.get('include_usage')),
             ignore_eos)


class Run:
  """A job's sequences in the engine: submitted at construction (a 503 ApiError when the
  queue is full, before any response starts), then iterated as (choice index, Delta) pairs as
  they arrive. The choice index i * n + j is also the request id folded into the sampling key,
  so choice i of a seeded request samples what `llmjax.generate --seed` samples for row i.
  Leaving the iteration early (a client gone) cancels what still runs."""

  def __init__(self, served: Served, job: Job):
    self.inbox: asyncio.Queue = asyncio.Queue()
    self.engine = served.engine
    # Runs on the event loop (`create_app` hands each engine step's Deltas over at once).
    emitter = lambda index: lambda delta: self.inbox.put_nowait((index, delta))
    self.seqs = [Sequence(p, job.sampling, job.seed, i * job.n + j, job.stop, job.logprobs,
                          emitter(i * job.n + j), ignore_eos=job.ignore_eos)
                 for i, p in enumerate(job.prompts) for j in range(job.n)]
    try:
      served.engine.submit(self.seqs)
    except QueueFull as e:
      if served.metrics is not None:
        served.metrics.rejected.inc()
      raise ApiError(503, f"the server is busy: {e}; retry later.", kind='server_busy',
                     headers={'Retry-After': '1'}) from None

  async def __aiter__(self) -> AsyncIterator[tuple[int, Delta]]:
    left = len(self.seqs)
    try:
      while left:
        index, delta = await self.inbox.get()
        left -= delta.finish_reason is not None
        if delta.finish_reason == 'error':
          raise ApiError(500, 'the engine failed; see the server log.', kind='server_error')
        yield index, delta
    finally:
      if left:
        self.engine.cancel(self.seqs)

  async def merged(self) -> AsyncIterator[tuple[int, Delta]]:
    """As iterating, but the Deltas of a choice that queued up while the client was being
    written to come merged into one (fewer, larger chunks under load; the same text)."""
    pending: dict[int, Delta] = {}
    async for index, delta in self:
      pending[index] = merge(pending[index], delta) if index in pending else delta
      if self.inbox.empty():
        for item in pending.items():
          yield item
        pending = {}
    for item in pending.items():
      yield item


def merge(a: Delta, b: Delta) -> Delta:
  """Delta a then b as one."""
  cat = lambda x, y: None if x is None and y is None else (x or []) + (y or [])
  return Delta(a.ids + b.ids, a.text + b.text, cat(a.logprobs, b.logprobs),
               cat(a.top_logprobs, b.top_logprobs), b.finish_reason or a.finish_reason,
               max(a.sampled, b.sampled))


@dataclasses.dataclass
class Choice:
  """One choice's accumulated output."""
  text: str = ''
  ids: list = dataclasses.field(default_factory=list)
  logprobs: list = dataclasses.field(default_factory=list)
  top: list = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  sampled: int = 0

  def add(self, d: Delta):
    self.text += d.text
    self.ids += d.ids
    self.logprobs += d.logprobs or []
    self.top += d.top_logprobs or []
    self.sampled = d.sampled or self.sampled
    if d.finish_reason:
      self.finish_reason = _FINISH[d.finish_reason]


async def collect(served: Served, job: Job, request: fastapi.Request) -> list[Choice]:
  """Runs the job to its end; a client that disconnects meanwhile cancels it."""
  choices = [Choice() for _ in range(len(job.prompts) * job.n)]
  run = Run(served, job)

  async def consume():
    async for i, d in run:
      choices[i].add(d)

  task = asyncio.ensure_future(consume())
  while True:
    done, _ = await asyncio.wait([task], timeout=1.0)
    if done:
      task.result()  # raises the job's ApiError
      return choices
    if await request.is_disconnected():
      task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await task
      raise ApiError(499, 'the client closed the request.')


def usage(job: Job, choices: list[Choice]) -> dict:
  prompt = sum(len(p) for p in job.prompts)
  completion = sum(c.sampled for c in choices)
  return {'prompt_tokens': prompt, 'completion_tokens': completion,
          'total_tokens': prompt + completion}


def _piece(served: Served, token: int) -> str:
  return served.tokenizer.decode([token]) if served.tokenizer is not None else str(token)


def completion_logprobs(served: Served, ids, lps, tops, with_top: bool, offset: int = 0) -> dict:
  """The completions API's (legacy) logprobs object."""
  tokens = [_piece(served, i) for i in ids]
  offsets, at = [], offset
  for t in tokens:
    offsets.append(at)
    at += len(t)
  top = [{_piece(served, i): lp for i, lp in row} for row in tops] if with_top else None
  return {'tokens': tokens, 'token_logprobs': lps, 'top_logprobs': top, 'text_offset': offsets}


def chat_logprobs(served: Served, ids, lps, tops) -> dict:
  """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
  def entry(i, lp):
    token = _piece(served, i)
    return {'token': token, 'logprob': lp, 'bytes': list(token.encode())}
  return {'content': [dict(entry(i, lp), top_logprobs=[entry(t, tlp) for t, tlp in top])
                      for i, lp, top in zip(ids, lps, tops)]}


def _sse(obj) -> str:
  return f'data: {json.dumps(obj)}\n\n'


# ----------------------------------------------------------------------------- the app

def create_app(served: Served) -> fastapi.FastAPI:
  """The FastAPI app over `served`; its lifespan starts the engine loop and, at shutdown
  (SIGTERM: uvicorn first lets the running requests finish), drains and stops it."""

  @contextlib.asynccontextmanager
  async def lifespan(app):
    loop = asyncio.get_running_loop()

    def dispatch(items):  # on the event loop: each sequence's Delta to its request
      for seq, delta in items:
        seq.emit(delta)

    def deliver(items):  # on the engine thread: one wake-up of the event loop per step
      with contextlib.suppress(RuntimeError):  # the event loop already closed
        loop.call_soon_threadsafe(dispatch, items)

    served.engine.deliver = deliver
    if not served.engine.thread.is_alive():
      await loop.run_in_executor(None, served.engine.warmup)
      served.engine.start()
    yield
    await asyncio.get_running_loop().run_in_executor(None, served.engine.stop)

  app = fastapi.FastAPI(title='llmjax', lifespan=lifespan)

  @app.exception_handler(ApiError)
  async def api_error(request, e: ApiError):
    return e.response()

  async def body_of(request: fastapi.Request, known: set[str], endpoint: str) -> dict:
    try:
      body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise _bad(f"the request body is not valid JSON ({e}).") from None
    if not isinstance(body, dict):
      raise _bad("the request body must be a JSON object.")
    model = body.get('model')
    if model is not None and model != served.name:
      raise ApiError(404, f"the model '{model}' does not exist; this server serves"
                     f" '{served.name}' (GET /v1/models).", 'model', code='model_not_found')
    check_fields(body, known, endpoint)
    return body

  def stream_flag(body) -> bool:
    return bool(_get(body, 'stream', (bool,), False, 'true or false'))

  @app.post('/v1/completions')
  async def completions(request: fastapi.Request):
    body = await body_of(request, COMPLETION_FIELDS, '/v1/completions')
    logprobs = _get(body, 'logprobs', (int,), None, 'an integer (top log-probs per token)')
    if logprobs is not None and not 0 <= logprobs <= served.engine.max_logprobs:
      raise _bad(f"logprobs={logprobs}: must be in [0, {served.engine.max_logprobs}].",
                 'logprobs')
    job = job_of(served, body, completion_prompts(served, body), logprobs=logprobs,
                 default_max=16)  # OpenAI's default for completions
    rid, created = f'cmpl-{uuid.uuid4().hex}', int(time.time())
    head = {'id': rid, 'object': 'text_completion', 'created': created, 'model': served.name}
    with_top = bool(logprobs)
    if stream_flag(body):
      run = Run(served, job)

      async def events():
        offsets = [0] * (len(job.prompts) * job.n)
        done = [Choice() for _ in offsets]
        async for i, d in run.merged():
          done[i].add(d)
          if not (d.text or d.ids or d.finish_reason):
            continue
          lp = None
          if logprobs is not None:
            lp = completion_logprobs(served, d.ids, d.logprobs, d.top_logprobs, with_top,
                                     offsets[i])
          offsets[i] += len(d.text)
          choice = {'index': i, 'text': d.text, 'logprobs': lp,
                    'finish_reason': _FINISH[d.finish_reason] if d.finish_reason else None}
          yield _sse(dict(head, choices=[choice]))
        if job.include_usage:
          yield _sse(dict(head, choices=[], usage=usage(job, done)))
        yield 'data: [DONE]\n\n'
      return responses.StreamingResponse(events(), media_type='text/event-stream')
    choices = await collect(served, job, request)
    out = [{'index': i, 'text': c.text, 'finish_reason': c.finish_reason,
            'logprobs': (completion_logprobs(served, c.ids, c.logprobs, c.top, with_top)
                         if logprobs is not None else None)}
           for i, c in enumerate(choices)]
    return dict(head, choices=out, usage=usage(job, choices))

  @app.post('/v1/chat/completions')
  async def chat_completions(request: fastapi.Request):
    body = await body_of(request, CHAT_FIELDS, '/v1/chat/completions')
    want = _get(body, 'logprobs', (bool,), False, 'true or false')
    top = _get(body, 'top_logprobs', (int,), None, 'an integer')
    if top is not None and not want:
      raise _bad("top_logprobs needs logprobs=true.", 'top_logprobs')
    if top is not None and not 0 <= top <= served.engine.max_logprobs:
      raise _bad(f"top_logprobs={top}: must be in [0, {served.engine.max_logprobs}].",
                 'top_logprobs')
    prompt = chat_prompt(served, body)
    # The template's end-of-turn text ends a reply even where it is plain text to the
    # tokenizer, not an EOS id (ChatML on a tokenizer trained by the run), as in llmjax.chat.
    job = job_of(served, body, [prompt], logprobs=(top or 0) if want else None,
                 default_max=None, extra_stop=[served.end_of_turn])
    rid, created = f'chatcmpl-{uuid.uuid4().hex}', int(time.time())
    if stream_flag(body):
      head = {'id': rid, 'object': 'chat.completion.chunk', 'created': created,
              'model': served.name}

      run = Run(served, job)

      async def events():
        done = [Choice() for _ in range(job.n)]
        for i in range(job.n):
          yield _sse(dict(head, choices=[{'index': i, 'delta': {'role': 'assistant',
                                                                'content': ''},
                                          'logprobs': None, 'finish_reason': None}]))
        async for i, d in run.merged():
          done[i].add(d)
          if not (d.text or d.ids or d.finish_reason):
            continue
          lp = chat_logprobs(served, d.ids, d.logprobs, d.top_logprobs) if want else None
          choice = {'index': i, 'delta': {'content': d.text} if d.text else {}, 'logprobs': lp,
                    'finish_reason': _FINISH[d.finish_reason] if d.finish_reason else None}
          yield _sse(dict(head, choices=[choice]))
        if job.include_usage:
          yield _sse(dict(head, choices=[], usage=usage(job, done)))
        yield 'data: [DONE]\n\n'
      return responses.StreamingResponse(events(), media_type='text/event-stream')
    choices = await collect(served, job, request)
    out = [{'index': i, 'message': {'role': 'assistant', 'content': c.text},
            'finish_reason': c.finish_reason,
            'logprobs': chat_logprobs(served, c.ids, c.logprobs, c.top) if want else None}
           for i, c in enumerate(choices)]
    return {'id': rid, 'object': 'chat.completion', 'created': created, 'model': served.name,
            'choices': out, 'usage': usage(job, choices)}

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [{'id': served.name, 'object': 'model', 'created': 0,
                                        'owned_by': 'llmjax', 'max_model_len': served.max_len}]}

  @app.get('/health')
  async def health():
    if not served.engine.alive():
      raise ApiError(503, 'the engine loop is not running; see the server log.',
                     kind='server_error')
    return {'status': 'ok'}

  @app.get('/metrics')
  async def metrics():
    text = served.metrics.render(served.engine) if served.metrics else b''
    return responses.Response(text, media_type=metrics_lib.CONTENT_TYPE)

  @app.get('/')
  async def chat_page():
    page = importlib.resources.files('llmjax.serve').joinpath('chat.html')
    if not page.is_file():
      raise ApiError(404, 'no chat page in this install.', code='not_found')
    return responses.HTMLResponse(page.read_text())

  return app
