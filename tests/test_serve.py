"""llmjax.serve: an OpenAI-compatible server started on a free loopback port and driven with the
official `openai` client. Greedy replies with 32 requests in flight equal `llmjax.generate`'s
(its CLI, batched, and the engine alone per prompt); a seed gives the same sample whatever else
runs; streamed text equals the non-streamed; usage is exact; bad requests get OpenAI-style 400s
and the server keeps serving; a full queue gets 503 + Retry-After; a client that disconnects
mid-stream frees its slot for the next request; shutdown (SIGTERM's path) drains the running
requests."""

import concurrent.futures
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time

import httpx
import jax
import pytest

openai = pytest.importorskip('openai')

import llmjax.models
from llmjax import generate
from llmjax.data import chat as chat_data
from llmjax.infer import engine
from llmjax.infer.engine import SamplingParams
from llmjax.serve import __main__ as serve_cli
from llmjax.serve import api
from llmjax.serve import engine_loop

HERE = os.path.dirname(__file__)
QWEN = os.path.join(HERE, 'golden', 'qwen2_bias_tied')  # byte-level BPE, BOS 1, EOS 2, context 128
WORDS = ('the cat', 'a dog', 'seven', 'blue sky', 'in the garden', 'quietly', 'tomorrow we',
         'rivers and', 'x = 3 +', 'Once upon a time')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A run's workdir (params at step 0, the tokenizer, ChatML as its chat template), as in
  tests/test_chat_cli.py; a large init makes greedy replies vary with the prompt."""
  from llmjax.data.pipeline import HF_TOKENIZER_DIR
  from llmjax.interop import load_hf
  from llmjax.interop.tokenizer import TOKENIZER_READ_FILES
  from llmjax.train import checkpoint
  d = str(tmp_path_factory.mktemp('run'))
  cfg, _, _ = load_hf(QWEN)
  params = llmjax.models.init_params(dataclasses.replace(cfg, init_std=0.3), jax.random.key(0))
  checkpoint.write_params_workdir(d, cfg, params)
  os.makedirs(os.path.join(d, HF_TOKENIZER_DIR))
  for name in TOKENIZER_READ_FILES:
    if os.path.exists(os.path.join(QWEN, name)):
      shutil.copy(os.path.join(QWEN, name), os.path.join(d, HF_TOKENIZER_DIR, name))
  with open(os.path.join(d, chat_data.RUN_TEMPLATE), 'w') as f:
    f.write(chat_data.template_source('chatml')[0])
  return d


class Live:
  """`llmjax.serve`'s app under uvicorn in a thread, on a free loopback port."""

  def __init__(self, workdir, **flags):
    # Buckets compile on first use (the few the tests need), not all at start.
    argv = [f'--workdir={workdir}', '--warmup=false'] + [f'--{k}={v}' for k, v in flags.items()]
    self.served = serve_cli.load_served(serve_cli.parse_flags(argv))
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    self.url = f'http://127.0.0.1:{sock.getsockname()[1]}'
    self.server = serve_cli.uvicorn_server(api.create_app(self.served), host='127.0.0.1',
                                           port=sock.getsockname()[1], log_level='warning')
    self.thread = threading.Thread(target=self.server.run, kwargs={'sockets': [sock]},
                                   daemon=True)
    self.thread.start()
    deadline = time.time() + 120
    while not self.server.started:
      assert time.time() < deadline and self.thread.is_alive(), 'the server did not start'
      time.sleep(0.05)
    self.client = openai.OpenAI(base_url=self.url + '/v1', api_key='none', max_retries=0)
    self.model = self.served.name

  def stop(self):
    self.server.should_exit = True
    self.thread.join(60)


@pytest.fixture(scope='module')
def live(workdir):
  s = Live(workdir, max_batch=32, prefill_chunk=32)  # the chat prompts are chunked
  yield s
  s.stop()


@pytest.fixture(scope='module')
def one_slot(workdir):
  """One slot and no queue: a second request while one runs is refused. A 64-token context
  (one decode span, few compiles)."""
  s = Live(workdir, max_batch=1, max_queue=0, max_model_len=64)
  yield s
  s.stop()


def _prompts(n=32):
  """n distinct prompts of 5 to 32 tokens (two prefill buckets: 16 and 32)."""
  out = [' '.join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 3)) + f' {i}'
         for i in range(n)]
  return [p[:30] for p in out]


def _generate_cli(capsys, workdir, prompts, *flags):
  """`python -m llmjax.generate --json` lines for these prompts."""
  assert generate.main([f'--workdir={workdir}', *[f'--prompt={p}' for p in prompts],
                        '--json', *flags]) == 0
  return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _tokens(served, ids):
  return [served.tokenizer.decode([i]) for i in ids]


def _metric(live, name):
  for line in httpx.get(live.url + '/metrics').text.splitlines():
    if line.startswith(name + ' ') or line.startswith(name + '{'):
      return float(line.rsplit(' ', 1)[1])
  return 0.0


# --- the proof: greedy = llmjax.generate, with 32 requests in flight

def test_32_concurrent_greedy_requests_equal_llmjax_generate(live, workdir, capsys):
  prompts = _prompts(32)
  want = _generate_cli(capsys, workdir, prompts, '--temperature=0', '--max_new_tokens=20')

  def ask(p):
    return live.client.completions.create(model=live.model, prompt=p, max_tokens=20,
                                          temperature=0, logprobs=0)
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    got = list(pool.map(ask, prompts))
  assert live.served.engine.peak_running >= 16  # they really ran together
  cfg, params = live.served.engine.cfg, live.served.engine.params
  eos = generate.stop_ids(live.served.tokenizer)
  for p, w, r in zip(prompts, want, got):
    c = r.choices[0]
    # Token for token (the logprobs' tokens are each id's text) and the same text.
    assert c.logprobs.tokens == _tokens(live.served, w['ids']), p
    assert c.text == w['text'], p
    assert r.usage.prompt_tokens == len(w['prompt_ids'])
    assert r.usage.completion_tokens == len(w['ids']) + (c.finish_reason == 'stop')
  assert len({w['text'] for w in want}) > 16  # replies that depend on the prompt
  # The CLI decoded the 32 as one batch; each prompt alone gives the same (one per bucket).
  assert {len(w['prompt_ids']) <= 16 for w in want} == {True, False}
  for w in (min(want, key=lambda w: len(w['prompt_ids'])),
            max(want, key=lambda w: len(w['prompt_ids']))):
    alone = engine.generate(cfg, params, [w['prompt_ids']], SamplingParams(20, temperature=0),
                            eos_id=eos)[0]
    assert alone.ids == w['ids']


def test_a_seed_samples_the_same_text_whatever_else_runs(live, workdir, capsys):
  kw = dict(model=live.model, prompt='Once upon a time', max_tokens=24, temperature=1.0,
            top_k=40, seed=1234)
  as_extra = lambda d: {k: v for k, v in d.items() if k != 'top_k'} | {
      'extra_body': {'top_k': d['top_k']}}
  alone = live.client.completions.create(**as_extra(kw)).choices[0].text
  want = _generate_cli(capsys, workdir, ['Once upon a time'], '--temperature=1.0',
                       '--top_k=40', '--seed=1234', '--max_new_tokens=24')[0]['text']
  assert alone == want

  def noise(i):
    return live.client.completions.create(model=live.model, prompt=_prompts(8)[i],
                                          max_tokens=30, temperature=1.0, seed=i).choices[0].text
  with concurrent.futures.ThreadPoolExecutor(9) as pool:
    others = [pool.submit(noise, i) for i in range(8)]
    again = pool.submit(lambda: live.client.completions.create(**as_extra(kw)))
    assert again.result().choices[0].text == alone
    [f.result() for f in others]
  two = live.client.completions.create(**as_extra(kw), n=2)
  assert two.choices[0].text == alone  # choice i samples as generate's row i
  assert two.choices[1].text != alone
  other = live.client.completions.create(**as_extra(dict(kw, seed=99))).choices[0].text
  assert other != alone


# --- prefix caching

SYSTEM = ('You are a careful assistant. Be brief. Now:')


@pytest.fixture(scope='module')
def prefix_live(workdir):
  s = Live(workdir, max_batch=2, max_model_len=128, prefix_caching='true')
  yield s
  s.stop()


def test_a_shared_prefix_is_reused_and_gives_generates_tokens(prefix_live, workdir, capsys):
  """Prompts that share a system prompt: after the first, each reuses a free slot's cached
  entries (the hit counter grows by whole blocks), and greedy and seeded replies are still
  `llmjax.generate`'s, token for token (generate prefills every prompt whole)."""
  prompts = [SYSTEM + ' ' + w for w in WORDS[:4]]
  ids = [api.text_prompt_ids(prefix_live.served.tokenizer, p) for p in prompts]
  assert min(len(i) for i in ids) > 2 * 16 and len(ids[0]) + 16 <= 128
  greedy = _generate_cli(capsys, workdir, prompts, '--temperature=0', '--max_new_tokens=16')
  sampled = _generate_cli(capsys, workdir, prompts[:1], '--temperature=1.0', '--seed=7',
                          '--max_new_tokens=16')[0]
  hits = _metric(prefix_live, 'llmjax_prefix_cache_hits_total')
  queries = _metric(prefix_live, 'llmjax_prefix_cache_queries_total')
  for p, w in zip(prompts, greedy):  # one at a time: each finds the last one's slot free
    c = prefix_live.client.completions.create(model=prefix_live.model, prompt=p, max_tokens=16,
                                              temperature=0, logprobs=0).choices[0]
    assert c.logprobs.tokens == _tokens(prefix_live.served, w['ids']), p
  text = prefix_live.client.completions.create(model=prefix_live.model, prompt=prompts[0],
                                               max_tokens=16, temperature=1.0,
                                               seed=7).choices[0].text
  assert text == sampled['text']
  gained = _metric(prefix_live, 'llmjax_prefix_cache_hits_total') - hits
  assert _metric(prefix_live, 'llmjax_prefix_cache_queries_total') - queries == sum(
      len(i) for i in ids) + len(ids[0])
  # The common prefix, in whole blocks, for each of the last four (the first may hit an
  # earlier test's slot or not).
  common = min(engine_loop.shared_prefix(ids[0], i) for i in ids[1:])
  assert common >= 32 and gained >= 4 * common


def test_shared_prefix_counts_whole_blocks_short_of_the_last_token():
  cached = list(range(40))
  assert engine_loop.shared_prefix(cached, list(range(40)) + [99]) == 32
  assert engine_loop.shared_prefix(cached, list(range(33))) == 32  # 32 kept, 1 to run
  assert engine_loop.shared_prefix(cached, list(range(32))) == 16  # the last token must run
  assert engine_loop.shared_prefix(cached, list(range(15)) + [99] * 30) == 0
  assert engine_loop.shared_prefix([], list(range(40))) == 0


# --- streaming, usage, chat

def _stream_text(live, **kw):
  chunks = list(live.client.completions.create(stream=True, stream_options={'include_usage': True},
                                               **kw))
  text = ''.join(c.choices[0].text for c in chunks if c.choices)
  finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
  return text, finish, chunks[-1].usage


@pytest.mark.parametrize('kw', [
    dict(temperature=0.0, max_tokens=40),
    dict(temperature=0.9, top_p=0.9, seed=5, max_tokens=40, presence_penalty=0.5,
         frequency_penalty=0.5),
    dict(temperature=0.0, max_tokens=40, stop=['e', 'zz']),
])
def test_streamed_text_equals_the_non_streamed_and_usage_is_exact(live, kw):
  kw = dict(model=live.model, prompt='the cat and a dog', **kw)
  whole = live.client.completions.create(**kw)
  text, finish, usage = _stream_text(live, **kw)
  assert text == whole.choices[0].text and finish == [whole.choices[0].finish_reason]
  assert usage == whole.usage
  prompt_ids = api.text_prompt_ids(live.served.tokenizer, kw['prompt'])
  assert usage.prompt_tokens == len(prompt_ids)
  if kw.get('stop'):
    assert whole.choices[0].finish_reason == 'stop' and 'e' not in text
  elif whole.choices[0].finish_reason == 'length':
    assert usage.completion_tokens == 40


def test_a_long_prompt_is_prefilled_in_chunks_with_generates_tokens(live, monkeypatch):
  from llmjax.serve import engine_loop
  calls, real = [], engine_loop._prefill_chunk
  monkeypatch.setattr(engine_loop, '_prefill_chunk',
                      lambda *a, **k: calls.append(int(a[4])) or real(*a, **k))
  ids = [1] + [(7 * i) % 200 + 3 for i in range(90)]  # 91 tokens: chunks at 0, 32, 64
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    short = pool.submit(live.client.completions.create, model=live.model, prompt=[1, 2, 3],
                        max_tokens=30, temperature=0)
    r = live.client.completions.create(model=live.model, prompt=ids, max_tokens=12,
                                       temperature=0, logprobs=0)
    short.result()
  assert calls == [0, 32, 64]
  want = engine.generate(live.served.engine.cfg, live.served.engine.params, [ids],
                         SamplingParams(12, temperature=0),
                         eos_id=generate.stop_ids(live.served.tokenizer))[0]
  assert r.choices[0].logprobs.tokens == _tokens(live.served, want.ids)
  assert r.usage.prompt_tokens == 91


def test_token_id_prompts_and_completion_logprobs(live):
  ids = [1, 40, 50, 60, 70]
  r = live.client.completions.create(model=live.model, prompt=ids, max_tokens=6, temperature=0,
                                     logprobs=3)
  want = engine.generate(live.served.engine.cfg, live.served.engine.params, [ids],
                         SamplingParams(6, temperature=0), eos_id=-1, logprobs=3)[0]
  lp = r.choices[0].logprobs
  assert r.usage.prompt_tokens == 5
  assert lp.tokens[:len(want.ids)] == _tokens(live.served, want.ids)[:len(lp.tokens)]
  assert lp.token_logprobs == pytest.approx(want.logprobs[:len(lp.tokens)], abs=1e-5)
  assert all(len(t) <= 3 for t in lp.top_logprobs)


def test_chat_completion_is_generate_chat_streamed_or_not(live, workdir, capsys):
  question = 'What is the capital of Peru?'
  assert generate.main([f'--workdir={workdir}', '--chat', f'--prompt={question}',
                        '--temperature=0', '--max_new_tokens=30', '--stop=<|im_end|>']) == 0
  want = capsys.readouterr().out[:-1]  # print's newline
  msgs = [{'role': 'user', 'content': question}]
  r = live.client.chat.completions.create(model=live.model, messages=msgs, temperature=0,
                                          max_tokens=30)
  assert r.choices[0].message.content == want and r.choices[0].message.role == 'assistant'
  chunks = list(live.client.chat.completions.create(model=live.model, messages=msgs,
                                                    temperature=0, max_tokens=30, stream=True))
  assert ''.join(c.choices[0].delta.content or '' for c in chunks) == want
  lp = live.client.chat.completions.create(model=live.model, messages=msgs, temperature=0,
                                           max_tokens=5, logprobs=True, top_logprobs=2)
  content = lp.choices[0].logprobs.content
  assert len(content) == lp.usage.completion_tokens - (lp.choices[0].finish_reason == 'stop')
  assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6
             for t in content)


def test_models_health_and_metrics(live):
  models = live.client.models.list()
  assert [m.id for m in models.data] == [live.model]
  assert httpx.get(live.url + '/health').json() == {'status': 'ok'}
  before = _metric(live, 'llmjax_generation_tokens_total')
  live.client.completions.create(model=live.model, prompt=[1, 2, 3], max_tokens=7,
                                 temperature=0)
  text = httpx.get(live.url + '/metrics').text
  for name in ('llmjax_request_success_total', 'llmjax_prompt_tokens_total',
               'llmjax_num_requests_running', 'llmjax_num_requests_waiting',
               'llmjax_time_to_first_token_seconds_bucket',
               'llmjax_time_per_output_token_seconds_count'):
    assert name in text, name
  assert 1 <= _metric(live, 'llmjax_generation_tokens_total') - before <= 7


# --- the CLI

def test_cli_help_and_one_line_flag_errors(capsys):
  assert serve_cli.main(['--help']) == 0
  out = capsys.readouterr().out
  assert all(f'--{f.name}' in out for f in serve_cli.FLAGS)
  for argv, message in ((['--workdir=W', '--max_batch=0'], '--max_batch=0'),
                        ([], 'exactly one of --workdir'),
                        (['--workdir=W', '--peft=P'], '--peft'),
                        (['--workdir=W', '--max_bacth=4'], "Did you mean 'max_batch'")):
    assert serve_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, err
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    assert serve_cli.main(['--workdir=/nonexistent', f'--port={port}']) == 2
    assert f'--port={port}' in capsys.readouterr().err  # before the (missing) model loads


# --- bad requests

BAD = [
    ('{"prompt": "hi", ', None),  # invalid JSON
    ({'prompt': 'hi', 'temperature': -1}, 'temperature'),
    ({'prompt': 'hi', 'top_p': 0}, 'top_p'),
    ({'prompt': 'hi', 'top_p': 1.5}, 'top_p'),
    ({'prompt': 'hi', 'temperature': 'hot'}, 'temperature'),
    ({'prompt': 'hi', 'presence_penalty': 3}, 'presence_penalty'),
    ({'prompt': [5] * 200}, 'prompt'),  # past the 128-token context
    ({'prompt': 'hi', 'max_tokens': 500}, 'max_tokens'),
    ({'prompt': 'hi', 'max_tokens': 0}, 'max_tokens'),
    ({'prompt': [1, 999]}, 'prompt'),  # outside the vocabulary
    ({'prompt': ''}, None),  # BOS only is fine: not an error
    ({'prompt': 'hi', 'n': 0}, 'n'),
    ({'prompt': 'hi', 'logprobs': 99}, 'logprobs'),
    ({'prompt': 'hi', 'stop': ['']}, 'stop'),
    ({'prompt': 'hi', 'echo': True}, 'echo'),
    ({}, 'prompt'),
]


@pytest.mark.parametrize('body, param', BAD)
def test_bad_requests_get_openai_400s_and_the_server_keeps_serving(live, body, param):
  content = body if isinstance(body, str) else json.dumps(body)
  r = httpx.post(live.url + '/v1/completions', content=content,
                 headers={'content-type': 'application/json'})
  if body == {'prompt': ''}:
    assert r.status_code == 200  # the prompt is BOS alone
    return
  assert r.status_code == 400, r.text
  error = r.json()['error']
  assert error['type'] == 'invalid_request_error' and error['message'] and '\n' not in error['message']
  assert error['param'] == param
  assert httpx.get(live.url + '/health').status_code == 200


def test_bad_chat_requests_and_unknown_fields(live, caplog):
  post = lambda body: httpx.post(live.url + '/v1/chat/completions', json=body)
  assert post({'messages': []}).status_code == 400
  assert post({'messages': [{'role': 'user'}]}).status_code == 400
  r = post({'messages': [{'role': 'user', 'content': 'hi'}], 'top_logprobs': 2})
  assert r.status_code == 400 and r.json()['error']['param'] == 'top_logprobs'
  assert post({'model': 'gpt-4', 'messages': [{'role': 'user', 'content': 'hi'}]}).status_code == 404
  with caplog.at_level(logging.INFO, logger='llmjax.serve'):
    r = post({'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 3,
              'frobnicate': 1, 'user': 'me'})
  assert r.status_code == 200 and 'frobnicate' in caplog.text
  with pytest.raises(openai.BadRequestError):
    live.client.chat.completions.create(model=live.model, messages=[{'role': 'user', 'content': 'x'}],
                                        temperature=-2)
  assert httpx.get(live.url + '/health').status_code == 200


# --- slots: back-pressure, disconnects, drain

def _slow(live, seconds):
  """Each decode step of `live` takes at least `seconds` (so that a request is still running
  when the test acts; the steps themselves are unchanged)."""
  real = live.served.engine._decode
  live.served.engine._decode = lambda: (time.sleep(seconds), real())[1]
  return lambda: setattr(live.served.engine, '_decode', real)


def _wait(cond, timeout=20.0):
  deadline = time.time() + timeout
  while not cond():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.02)


def test_full_queue_503_and_a_disconnect_frees_the_slot(one_slot):
  live = one_slot
  undo = _slow(live, 0.05)
  try:
    cancelled = _metric(live, 'llmjax_request_success_total{finished_reason="cancelled"}')
    body = {'prompt': 'the cat', 'max_tokens': 50, 'temperature': 0, 'stream': True,
            'ignore_eos': True}
    with httpx.Client(timeout=30) as client:
      with client.stream('POST', live.url + '/v1/completions', json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith('data:'))
        busy = httpx.post(live.url + '/v1/completions', json={'prompt': 'hi', 'max_tokens': 2})
        assert busy.status_code == 503 and busy.headers['retry-after'] == '1'
        assert busy.json()['error']['message']
      # The stream is closed with ~49 tokens to go (2.5 s at this speed).
    _wait(lambda: live.served.engine.num_running == 0, timeout=1.5)
    assert _metric(live, 'llmjax_request_success_total{finished_reason="cancelled"}') == cancelled + 1
    ok = httpx.post(live.url + '/v1/completions', json={'prompt': 'hi', 'max_tokens': 2})
    assert ok.status_code == 200 and ok.json()['usage']['completion_tokens'] <= 2
  finally:
    undo()


def test_shutdown_drains_running_requests(workdir):
  live = Live(workdir, max_batch=1, max_queue=4, max_model_len=64)  # `one_slot`'s shapes
  undo = _slow(live, 0.01)
  results = []

  def ask():
    results.append(httpx.post(live.url + '/v1/completions', timeout=60,
                              json={'prompt': [1, 2, 3], 'max_tokens': 40, 'temperature': 0}))
  threads = [threading.Thread(target=ask) for _ in range(2)]
  [t.start() for t in threads]
  _wait(lambda: live.served.engine.num_running == 1 and live.served.engine.num_waiting == 1)
  live.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler calls
  [t.join(60) for t in threads]
  live.thread.join(60)
  undo()
  assert [r.status_code for r in results] == [200, 200]
  want = engine.generate(live.served.engine.cfg, live.served.engine.params, [[1, 2, 3]],
                         SamplingParams(40, temperature=0), eos_id=generate.stop_ids(
                             live.served.tokenizer))[0]
  for r in results:
    assert r.json()['usage']['completion_tokens'] == len(want.ids) + (len(want.ids) < 40)
  assert not live.thread.is_alive() and not live.served.engine.thread.is_alive()
