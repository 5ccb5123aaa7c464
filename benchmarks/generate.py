"""KV-cache decode throughput: the generation engine against the sampler it replaced, side by
side in one process, on the benchmark shapes (the same as the Hugging Face peer's).

    python benchmarks/generate.py tiny      # or small
Prompts of 64 random tokens, 128 new tokens, no EOS; batch 1 and 8; best of --repeats runs
after a compile run. Rows:
  baseline_greedy   the old sampler (`benchmarks/baseline_sampler.py`: one jitted program per
                    set of sampling parameters, ids only)
  engine_greedy     `llmjax.infer.engine.generate`, temperature 0
  engine_sampled    temperature 0.8, top-p 0.9, per-row seeds
  engine_logprobs   greedy with each token's log-prob and the top-5 (--logprobs=5)
  engine_penalties  greedy with repetition_penalty=1.3 and no_repeat_ngram_size=3
and the seconds of the first call after the sampling parameters change (temperature 0.8 ->
0.7): the old sampler compiles a new program, the engine takes them as arrays.
Prints one JSON line; `decode_tokens_per_s_b1` / `_b8` (the keys other scripts read) are
engine_greedy's. The peer: python ../shared/bench/peer_hf.py generate tiny.
"""

import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baseline_sampler  # noqa: E402
from llmjax.infer import engine  # noqa: E402
from llmjax.models import get_preset, init_params  # noqa: E402


def _best(fn, repeats: int) -> float:
  fn()  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def main(size: str = 'tiny', new_tokens: int = 128, repeats: int = 3) -> dict:
  cfg = get_preset(size)
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  res = {}
  for b in (1, 8):
    prompts = rng.integers(0, cfg.vocab_size, (b, 64)).tolist()
    greedy = engine.SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    sampled = engine.SamplingParams(max_new_tokens=new_tokens, temperature=0.8, top_p=0.9)
    penalties = engine.SamplingParams(max_new_tokens=new_tokens, temperature=0.0,
                                      repetition_penalty=1.3, no_repeat_ngram_size=3)
    old = baseline_sampler.SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    run = lambda sp, **kw: jax.block_until_ready(
        [c.ids for c in engine.generate(cfg, params, prompts, sp, eos_id=-1, **kw)])
    rows = {
        'baseline_greedy': lambda: baseline_sampler.generate(cfg, params, prompts, old, eos_id=-1),
        'engine_greedy': lambda: run(greedy),
        'engine_sampled': lambda: run(sampled, seeds=list(range(b))),
        'engine_logprobs': lambda: run(greedy, logprobs=5),
        'engine_penalties': lambda: run(penalties),
    }
    for name, fn in rows.items():
      res[f'{name}_tokens_per_s_b{b}'] = round(b * new_tokens / _best(fn, repeats), 1)
    # The key other scripts read (benchmarks/compare.py, the README table): greedy decoding
    # with what `llmjax.generate` runs, the engine.
    res[f'decode_tokens_per_s_b{b}'] = res[f'engine_greedy_tokens_per_s_b{b}']
    # A change of sampling parameters: a new program for the old sampler, none for the engine.
    old_new = baseline_sampler.SamplingParams(max_new_tokens=new_tokens, temperature=0.7, top_p=0.9)
    baseline_sampler.generate(cfg, params, prompts, baseline_sampler.SamplingParams(
        max_new_tokens=new_tokens, temperature=0.8, top_p=0.9), eos_id=-1)
    t = time.perf_counter()
    baseline_sampler.generate(cfg, params, prompts, old_new, eos_id=-1)
    res[f'baseline_new_params_s_b{b}'] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    run(engine.SamplingParams(max_new_tokens=new_tokens, temperature=0.7, top_p=0.9))
    res[f'engine_new_params_s_b{b}'] = round(time.perf_counter() - t, 2)
  out = {'impl': 'llmjax', 'job': 'generate', 'size': size, 'params': cfg.num_params,
         'new_tokens': new_tokens, **res, 'device': jax.devices()[0].device_kind}
  print(json.dumps(out))
  return out


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else 'tiny')
