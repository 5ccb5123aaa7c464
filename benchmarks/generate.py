"""KV-cache decode throughput on the benchmark shapes (the same as the Hugging Face peer's).

    python benchmarks/generate.py tiny      # or small
Prompt of 64 random tokens, 128 new tokens, greedy; batch 1 and 8. Prints one JSON line.
The peer: python ../shared/bench/peer_hf.py generate tiny.
"""

import json
import sys
import time

import jax
import numpy as np

from llmjax.infer import sampler
from llmjax.models import get_preset, init_params


def main(size: str, new_tokens: int = 128):
  cfg = get_preset(size)
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  res = {}
  for b in (1, 8):
    prompts = rng.integers(0, cfg.vocab_size, (b, 64)).tolist()
    sp = sampler.SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    sampler.generate(cfg, params, prompts, sp, eos_id=-1)  # compile
    t = time.perf_counter()
    sampler.generate(cfg, params, prompts, sp, eos_id=-1)
    t = time.perf_counter() - t
    res[f'decode_tokens_per_s_b{b}'] = round(b * new_tokens / t, 1)
  print(json.dumps({'impl': 'llmjax', 'job': 'generate', 'size': size, 'params': cfg.num_params,
                    **res, 'device': jax.devices()[0].device_kind}))


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else 'tiny')
