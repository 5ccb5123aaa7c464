"""One serving decode step (`llmjax.serve.engine_loop._decode_rows`) timed side by side for this
tree and a git revision, so that a change to the step reports its own effect on one machine.

    python benchmarks/decode_step.py --workdir=/tmp/quickstart --baseline=main
    python benchmarks/decode_step.py --workdir=W --rows=32 --span=256 --baseline=HEAD~1

The baseline's `llmjax` is `git archive`d into a temporary directory; each side runs in its own
subprocess (compile, then --steps timed steps) and the two alternate for --rounds rounds, so a
busy machine slows both alike. The state is the benchmark's workload: `rows` sequences of
random lengths in [span/4, span) at temperature 0.8, no penalties or truncation (as
`benchmarks/serve.py` sends), over the workdir's model config with random params (the step's
cost does not depend on the weights' values). Prints the median ms per step of each round and
one JSON line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r'''
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from llmjax.infer import engine
from llmjax.models import init_params
from llmjax.models.transformer import Cache
from llmjax.serve import engine_loop
from llmjax.train import checkpoint

workdir, rows, span, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = checkpoint.read_model_config(workdir)
params = init_params(cfg, jax.random.key(0))
rng = np.random.default_rng(0)
n = rows + 1  # the serving loop's scratch row
length = np.ones((n,), np.int32)
# Room for `steps` more tokens below span, so every step reads the same span.
length[:rows] = rng.integers(span // 4, span - steps - 2, rows)
state = engine.DecodeState.empty(n, span, (), 0)
sp = engine.Sampling.of([engine.SamplingParams(temperature=0.8, max_new_tokens=10**6)] * n,
                        list(range(n)), [0] * n)
state = state.replace(tokens=rng.integers(0, cfg.vocab_size, (n, span)).astype(np.int32),
                      length=length, prompt_len=np.maximum(length - 8, 1).astype(np.int32),
                      done=np.arange(n) == rows, sampling=sp)
cache = engine.new_cache(cfg, n, span)
cache = Cache(cache.k, cache.v, jnp.maximum(jnp.asarray(length) - 1, 0))
cache, state = jax.device_put((cache, state), jax.devices()[0])
times = []
for i in range(steps + 3):  # 3 untimed: compile and warm
  t = time.perf_counter()
  cache, state, latest = engine_loop._decode_rows(params, cache, state, cfg=cfg, rows=rows,
                                                  span=span)
  jax.block_until_ready(latest)
  times.append(time.perf_counter() - t)
import llmjax
print(json.dumps({'ms': float(np.median(times[3:])) * 1000, 'llmjax': llmjax.__file__}))
'''


def _side(path: str, args) -> float:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'), PYTHONPATH=path)
  out = subprocess.run([sys.executable, '-c', _CHILD, args.workdir, str(args.rows), str(args.span),
                        str(args.steps)], env=env, check=True, capture_output=True, text=True,
                       cwd=tempfile.gettempdir())  # not a checkout: '' on sys.path would win
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res['llmjax'].startswith(path), f"imported {res['llmjax']}, not {path}'s llmjax"
  return res['ms']


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='an llmjax run (its model_config.json)')
  p.add_argument('--baseline', default='main', help='the git revision to compare against')
  p.add_argument('--rows', type=int, default=32)
  p.add_argument('--span', type=int, default=256)
  p.add_argument('--steps', type=int, default=50)
  p.add_argument('--rounds', type=int, default=3)
  args = p.parse_args(argv)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as base:
    archive = subprocess.run(['git', '-C', repo, 'archive', args.baseline, 'llmjax'],
                             check=True, capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', base], input=archive, check=True)
    res = {'baseline': [], 'this_tree': []}
    for r in range(args.rounds):
      res['baseline'].append(round(_side(base, args), 3))
      res['this_tree'].append(round(_side(repo, args), 3))
      print(f"round {r}: {args.baseline} {res['baseline'][-1]:.2f} ms, this tree"
            f" {res['this_tree'][-1]:.2f} ms", flush=True)
  out = {'rows': args.rows, 'span': args.span, 'baseline_rev': args.baseline,
         'baseline_ms': min(res['baseline']), 'this_tree_ms': min(res['this_tree']),
         'rounds': res}
  print(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
