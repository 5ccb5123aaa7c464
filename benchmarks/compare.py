"""llmjax against Hugging Face transformers (PyTorch) on the same shapes, side by side in one run.

    python benchmarks/compare.py [--rounds=2] [--sizes=tiny,small] [--jobs=train,generate]
                                 [--peer_python=/tmp/hf/bin/python] [--shared=../shared] [--json=F]

Each round runs every job twice, llmjax and the peer (`shared/bench/peer_hf.py`), one after
the other (the order alternating from round to round), each in its own process on the whole
machine; a job's figure is its best over the rounds, since the machine's speed drifts and the
best run is the one least disturbed. The matmul peak (`shared/bench/cpu_peak.py`, 2048^3, JAX
and PyTorch) is measured in the same run, before the jobs.

Jobs (the shapes of peer_hf.py's SIZES, which `benchmarks/train.py` and `generate.py` share):
  train SIZE fp32|bf16  `benchmarks/train.py SIZE [bf16]` / `peer_hf.py train SIZE [bf16]`:
                        tokens/s of a full step (forward, backward, AdamW), model TFLOP/s by the
                        PaLM formula (both scripts count the same FLOPs), MFU against the
                        machine's measured matmul peak in that precision (the better of JAX's
                        and PyTorch's: what the silicon can do, not what one framework gets)
  generate SIZE         `benchmarks/generate.py SIZE` / `peer_hf.py generate SIZE`: greedy KV-cache
                        decode tokens/s at batch 1 and 8 (64-token prompts, 128 new tokens)
Peak memory is each process's maximum resident set (getrusage of that child): the framework's
own footprint included, for both.

The peer's Python is a Python 3.11 venv with torch==2.13.0 and transformers, created at
--peer_python's venv on first use. Prints one Markdown table (the README's) and, with --json,
writes every raw result.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, 'benchmarks')


def ensure_peer(python: str) -> str:
  """The peer's interpreter, its venv created (python3.11, torch 2.13.0 CPU, transformers)
  when missing."""
  if os.path.exists(python):
    return python
  venv = os.path.dirname(os.path.dirname(python))
  print(f'creating the peer venv {venv} (python3.11, torch==2.13.0, transformers)', flush=True)
  subprocess.run(['python3.11', '-m', 'venv', venv], check=True)
  subprocess.run([python, '-m', 'pip', 'install', '-q', 'torch==2.13.0', 'transformers'],
                 check=True)
  return python


def measure(cmd: list[str], log) -> dict:
  """Runs `cmd` (it prints one JSON line last); returns that line's dict plus 'wall_s' and
  'peak_rss_mb' (the child's own maximum resident set, from wait4)."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  began = time.perf_counter()
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env)
  out = p.stdout.read()
  _, status, usage = os.wait4(p.pid, 0)
  p.returncode = os.waitstatus_to_exitcode(status)
  if p.returncode:
    sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}; see {log.name}")
  res = json.loads(out.strip().splitlines()[-1])
  res['wall_s'] = round(time.perf_counter() - began, 1)
  res['peak_rss_mb'] = round(usage.ru_maxrss / 1024, 1)  # Linux reports KiB
  return res


def jobs(sizes, kinds) -> list[tuple[str, str, bool]]:
  out = []
  for size in sizes:
    if 'train' in kinds:
      out += [('train', size, False), ('train', size, True)]
    if 'generate' in kinds:
      out.append(('generate', size, False))
  return out


def commands(job: str, size: str, bf16: bool, peer_py: str, shared: str):
  """(llmjax's command, the peer's command) for one job."""
  flag = ['bf16'] if bf16 else []
  ours = [sys.executable, os.path.join(HERE, f'{job}.py'), size, *flag]
  peer = [peer_py, os.path.join(shared, 'bench', 'peer_hf.py'), job, size, *flag]
  return ours, peer


def better(a: dict | None, b: dict, key: str) -> dict:
  return b if a is None or b[key] > a[key] else a


def table(peak: dict, best: dict) -> str:
  """The Markdown table of the best results."""
  lines = ['| job | llmjax | HF transformers | ratio | llmjax TFLOP/s (MFU) | HF TFLOP/s (MFU) '
           '| peak memory llmjax / HF |', '|---|---|---|---|---|---|---|']
  for (job, size, bf16), (ours, peer) in best.items():
    mem = f"{ours['peak_rss_mb']:,.0f} / {peer['peak_rss_mb']:,.0f} MB"
    if job == 'train':
      dt = 'bfloat16' if bf16 else 'float32'
      top = max(peak.get(f'jax_{dt}_gflops', 0), peak.get(f'torch_{dt}_gflops', 0)) / 1e3
      mfu = lambda r: (f"{r['model_tflops_per_s']:.3f} ({r['model_tflops_per_s'] / top:.0%})"
                       if top else f"{r['model_tflops_per_s']:.3f}")
      lines.append(f"| train {size} {'bf16' if bf16 else 'fp32'} (tokens/s) "
                   f"| {ours['tokens_per_s']:,.0f} | {peer['tokens_per_s']:,.0f} "
                   f"| {ours['tokens_per_s'] / peer['tokens_per_s']:.2f} | {mfu(ours)} "
                   f"| {mfu(peer)} | {mem} |")
    else:
      for b in (1, 8):
        k = f'decode_tokens_per_s_b{b}'
        lines.append(f'| decode {size} batch {b} (tokens/s) | {ours[k]:,.0f} | {peer[k]:,.0f} '
                     f'| {ours[k] / peer[k]:.2f} | | | {mem} |')
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--sizes', default='tiny,small')
  p.add_argument('--jobs', default='train,generate')
  p.add_argument('--peer_python', default='/tmp/hf/bin/python')
  p.add_argument('--shared', default=os.path.join(os.path.dirname(ROOT), 'shared'),
                 help='the folder holding bench/peer_hf.py and bench/cpu_peak.py')
  p.add_argument('--json', default='', help='write the raw results here')
  p.add_argument('--log', default='/tmp/compare_stderr.log', help="the jobs' stderr")
  a = p.parse_args()
  for f in ('peer_hf.py', 'cpu_peak.py'):
    if not os.path.exists(os.path.join(a.shared, 'bench', f)):
      sys.exit(f'--shared={a.shared}: no bench/{f} there; pass the folder that holds it.')
  sizes = [s for s in a.sizes.split(',') if s]
  kinds = [k for k in a.jobs.split(',') if k]
  for k in kinds:
    if k not in ('train', 'generate'):
      sys.exit(f"--jobs: unknown job '{k}'; use train and/or generate.")
  peer_py = ensure_peer(a.peer_python)
  with open(a.log, 'w') as log:
    peak_script = os.path.join(a.shared, 'bench', 'cpu_peak.py')
    peak = measure([sys.executable, peak_script, 'jax'], log)
    peak.update(measure([peer_py, peak_script, 'torch'], log))
    print('matmul peak (GFLOP/s):', {k: v for k, v in peak.items() if k.endswith('gflops')},
          flush=True)
    raw, best = [], {}
    for r in range(a.rounds):
      for job in jobs(sizes, kinds):
        ours_cmd, peer_cmd = commands(*job, peer_py, a.shared)
        order = [('llmjax', ours_cmd), ('peer', peer_cmd)]
        results = {}
        for who, cmd in (order if r % 2 == 0 else order[::-1]):
          results[who] = measure(cmd, log)
          raw.append({'round': r, 'job': list(job), 'who': who, **results[who]})
          print(f'round {r} {who} {job}: {json.dumps(results[who])}', flush=True)
        key = 'tokens_per_s' if job[0] == 'train' else 'decode_tokens_per_s_b8'
        o, q = best.get(job, (None, None))
        best[job] = (better(o, results['llmjax'], key), better(q, results['peer'], key))
  print()
  print(table(peak, best))
  if a.json:
    with open(a.json, 'w') as f:
      json.dump({'peak': peak, 'runs': raw}, f, indent=1)


if __name__ == '__main__':
  main()
