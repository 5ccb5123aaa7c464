"""Serving throughput and latency: `python -m llmjax.serve` under a load generator on loopback,
N concurrent clients against the same requests one at a time.

    python benchmarks/serve.py --workdir=/tmp/quickstart        # or --hf=HF_DIR
    python benchmarks/serve.py --workdir=W --requests=64 --concurrency=32 --max_batch=32
    python benchmarks/serve.py --workdir=W --shared_prefix=100   # with and without prefix caching

The server runs as a subprocess (its own cores, as in use); the client is one asyncio process
with httpx, streaming every request (server-sent events) to time its tokens. Workload: prompts
are the first 8 to 48 words of held-out documents of the embedded corpus, max_tokens uniform
in [32, 128] with `ignore_eos` (vLLM's benchmark's fixed output lengths; --no_ignore_eos lets
the model stop at EOS), temperature 0.8 with seed = request index: each request samples the
same tokens in both runs, so the two runs do the same work. The server compiles every bucket
before it answers /health (--warmup), and one short pass runs before the measured ones.

Metrics, as vLLM's benchmark (benchmarks/benchmark_serving.py) defines them:
  requests/s, output tok/s  completed requests and output tokens (usage.completion_tokens) over
                            the run's wall time
  TTFT                      request sent -> first streamed token
  TPOT                      (latency - TTFT) / (output tokens - 1): the first token excluded
p50 and p99 of TTFT and TPOT over requests. Prints a table and one JSON line.

--shared_prefix=N puts the same N words (a held-out document's: a system prompt or few-shot
examples) before every prompt, and runs the whole benchmark twice, the server with
--prefix_caching=true and =false, reporting both and the prefix cache's hit rate (hit tokens /
prompt tokens looked up, from /metrics).
"""

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx
import numpy as np


def workload(n: int, seed: int = 0, ignore_eos: bool = True, words=(8, 48),
             tokens=(32, 128), shared_prefix: int = 0) -> list[dict]:
  """n request bodies (without `model`/`stream`), from held-out corpus documents: prompts of
  `words` (low, high) words, max_tokens uniform in `tokens` (low, high), each after the same
  `shared_prefix` words (another document's, repeated as needed)."""
  from llmjax.data.corpus import default_corpus
  rng = random.Random(seed)
  docs = default_corpus('validation')
  prefix = ''
  if shared_prefix:
    words_ = ' '.join(random.Random(seed + 1).sample(docs, 8)).split()
    prefix = ' '.join((words_ * (shared_prefix // len(words_) + 1))[:shared_prefix]) + '\n\n'
  out = []
  for i in range(n):
    doc = rng.choice(docs).split()
    out.append({'prompt': prefix + ' '.join(doc[:rng.randint(*words)]),
                'max_tokens': rng.randint(*tokens), 'temperature': 0.8, 'seed': i,
                'ignore_eos': ignore_eos})
  return out


async def one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
  """Streams one completion: {'ttft', 'latency', 'tokens'} in seconds / tokens."""
  body = dict(body, stream=True, stream_options={'include_usage': True})
  start = time.perf_counter()
  ttft, tokens = None, 0
  async with client.stream('POST', url + '/v1/completions', json=body) as r:
    r.raise_for_status()
    async for line in r.aiter_lines():
      if not line.startswith('data: ') or line == 'data: [DONE]':
        continue
      chunk = json.loads(line[6:])
      if chunk.get('usage'):
        tokens = chunk['usage']['completion_tokens']
      elif ttft is None and chunk['choices']:
        ttft = time.perf_counter() - start
  return {'ttft': ttft, 'latency': time.perf_counter() - start, 'tokens': tokens}


async def run(url: str, bodies: list[dict], concurrency: int) -> dict:
  """`concurrency` clients, each sending its next request when the last one ends."""
  queue = list(enumerate(bodies))
  results = [None] * len(bodies)

  async def client_loop(client):
    while queue:
      i, body = queue.pop(0)
      results[i] = await one(client, url, body)

  limits = httpx.Limits(max_connections=concurrency + 4)
  async with httpx.AsyncClient(timeout=600, limits=limits) as client:
    start = time.perf_counter()
    await asyncio.gather(*[client_loop(client) for _ in range(concurrency)])
    wall = time.perf_counter() - start
  return summarize(results, wall)


def summarize(results: list[dict], wall: float) -> dict:
  tokens = sum(r['tokens'] for r in results)
  ttft = np.array([r['ttft'] for r in results])
  tpot = np.array([(r['latency'] - r['ttft']) / (r['tokens'] - 1)
                   for r in results if r['tokens'] > 1])
  ms = lambda a, q: round(float(np.percentile(a, q)) * 1000, 1)
  return {'requests': len(results), 'wall_s': round(wall, 2),
          'requests_per_s': round(len(results) / wall, 2),
          'output_tokens': tokens, 'output_tok_per_s': round(tokens / wall, 1),
          'ttft_p50_ms': ms(ttft, 50), 'ttft_p99_ms': ms(ttft, 99),
          'tpot_p50_ms': ms(tpot, 50), 'tpot_p99_ms': ms(tpot, 99)}


def engine_seconds(url: str) -> dict:
  """The server's cumulative decode-step time so far (device, host) and step count, from its
  /metrics: where a run's wall time went."""
  out = {}
  for line in httpx.get(url + '/metrics', timeout=10).text.splitlines():
    for name, key in (('llmjax_decode_step_seconds_sum', 'device_s'),
                      ('llmjax_decode_host_seconds_sum', 'host_s'),
                      ('llmjax_decode_step_seconds_count', 'steps'),
                      ('llmjax_prefix_cache_hits_total', 'prefix_hits'),
                      ('llmjax_prefix_cache_queries_total', 'prefix_queries')):
      if line.startswith(name + ' '):
        out[key] = float(line.split()[1])
  return out


def timed(url: str, bodies: list[dict], concurrency: int) -> dict:
  """`run`, plus the decode steps it took and their device and host seconds (the rest of the
  wall time is prefills and the HTTP side)."""
  before = engine_seconds(url)
  res = asyncio.run(run(url, bodies, concurrency))
  after = engine_seconds(url)
  delta = {k: after[k] - before.get(k, 0.0) for k in after}
  queries = delta.get('prefix_queries', 0.0)
  return dict(res, decode_steps=int(delta.get('steps', 0)),
              decode_device_s=round(delta.get('device_s', 0.0), 2),
              decode_host_s=round(delta.get('host_s', 0.0), 2),
              prefix_hit_rate=round(delta.get('prefix_hits', 0.0) / queries, 3) if queries else 0.0)


def start_server(args, prefix_caching: bool = False) -> tuple[subprocess.Popen, str]:
  sock = socket.socket()
  sock.bind(('127.0.0.1', 0))
  port = sock.getsockname()[1]
  sock.close()
  source = [f'--workdir={args.workdir}'] if args.workdir else [f'--hf={args.hf}']
  cmd = [sys.executable, '-m', 'llmjax.serve', *source, f'--port={port}',
         f'--max_batch={args.max_batch}', f'--max_model_len={args.max_model_len}',
         '--max_logprobs=0', '--log_level=warning',
         f'--prefix_caching={str(prefix_caching).lower()}']
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 600
  while True:
    if proc.poll() is not None:
      raise SystemExit(f'the server exited ({proc.returncode}): run {" ".join(cmd)} to see why')
    try:
      if httpx.get(url + '/health', timeout=2).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      pass
    if time.time() > deadline:
      proc.kill()
      raise SystemExit('the server did not start in 10 minutes')
    time.sleep(0.5)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='')
  p.add_argument('--hf', default='')
  p.add_argument('--requests', type=int, default=64)
  p.add_argument('--concurrency', type=int, default=32)
  p.add_argument('--max_batch', type=int, default=32)
  p.add_argument('--max_model_len', type=int, default=256,
                 help='the context each slot holds (prompts here are < 100 tokens)')
  p.add_argument('--no_ignore_eos', action='store_true', help='stop requests at EOS')
  p.add_argument('--words', default='8,48', help='prompt length range in corpus words')
  p.add_argument('--tokens', default='32,128', help='max_tokens range')
  p.add_argument('--shared_prefix', type=int, default=0,
                 help='words of one common prefix before every prompt; runs with and without'
                 ' prefix caching')
  args = p.parse_args(argv)
  if bool(args.workdir) == bool(args.hf):
    raise SystemExit('pass --workdir=DIR or --hf=HF_DIR')
  pair = lambda text: tuple(int(x) for x in text.split(','))
  bodies = workload(args.requests, ignore_eos=not args.no_ignore_eos, words=pair(args.words),
                    tokens=pair(args.tokens), shared_prefix=args.shared_prefix)
  if not args.shared_prefix:
    return measure(args, bodies)
  res = {'prefix_caching': measure(args, bodies, True), 'no_prefix_caching':
         measure(args, bodies, False)}
  for run in ('concurrent', 'one_at_a_time'):
    on, off = res['prefix_caching'][run], res['no_prefix_caching'][run]
    print(f"{run}: TTFT p50 {on['ttft_p50_ms']} ms with prefix caching (hit rate"
          f" {on['prefix_hit_rate']}), {off['ttft_p50_ms']} ms without; output tok/s"
          f" {on['output_tok_per_s']} vs {off['output_tok_per_s']}")
  print(json.dumps(res))
  return res


def measure(args, bodies: list[dict], prefix_caching: bool = False) -> dict:
  """Starts a server, warms it, and runs `bodies` concurrently then one at a time."""
  proc, url = start_server(args, prefix_caching)
  try:
    # Warm-up: compiles the prefill buckets (alone and 8 at a time) and the decode row buckets.
    asyncio.run(run(url, [dict(b, max_tokens=4) for b in bodies], args.concurrency))
    asyncio.run(run(url, [dict(b, max_tokens=4) for b in bodies[:8]], 1))
    concurrent = timed(url, bodies, args.concurrency)
    serial = timed(url, bodies, 1)
  finally:
    proc.terminate()
    proc.wait(60)
  assert concurrent['output_tokens'] == serial['output_tokens'], 'the runs sampled differently'
  res = {'concurrent': dict(concurrent, concurrency=args.concurrency),
         'one_at_a_time': serial,
         'speedup_output_tok_per_s': round(concurrent['output_tok_per_s']
                                           / serial['output_tok_per_s'], 2)}
  keys = ['requests_per_s', 'output_tok_per_s', 'ttft_p50_ms', 'ttft_p99_ms', 'tpot_p50_ms',
          'tpot_p99_ms', 'wall_s', 'decode_device_s', 'decode_host_s', 'prefix_hit_rate']
  print(f"{'run':<16}" + ''.join(f'{k:>18}' for k in keys))
  for name in ('concurrent', 'one_at_a_time'):
    print(f'{name:<16}' + ''.join(f'{res[name][k]:>18}' for k in keys))
  print(json.dumps(res))
  return res


if __name__ == '__main__':
  main()
