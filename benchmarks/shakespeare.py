"""Character-level Tiny Shakespeare: nanoGPT's CPU recipe against llmjax, alternately, one table.

    python benchmarks/shakespeare.py --data=../shared/data/tinyshakespeare.txt \\
        [--torch_python=PY] [--nanogpt_dir=DIR] [--rounds=1] [--variants=,long]

Each round runs nanoGPT's documented CPU recipe (its README's baby GPT: 4 layers, 4 heads,
width 128, context 64, batch 12, 2000 iterations; DIR/run.sh, default ../shared/bench/nanogpt
beside the repo), then `python -m llmjax.main --config=experiments/shakespeare_char.py[:V]` for
each variant V, one after another so that they share the machine's conditions. Prints wall
seconds and bits per character on the whole validation split (the last 10% of characters, in
non-overlapping windows of the context length) for each run, and a median per entry.

nanoGPT's wall time is run.sh's: its train.py alone, start-up included, data preparation and
the full-split scoring (fullval.py) excluded. llmjax's is the whole command, the final
full-split evaluation and checkpoint included.

--torch_python: a Python with torch and numpy for nanoGPT; default: a venv made on first use
at ~/.cache/llmjax/nanogpt-venv with python3.11 (pip install torch==2.13.0 numpy).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_python(given: str) -> str:
  if given:
    return given
  venv = os.path.expanduser('~/.cache/llmjax/nanogpt-venv')
  py = os.path.join(venv, 'bin', 'python')
  if not os.path.exists(py):
    print(f'creating {venv} (torch, numpy) for nanoGPT ...', flush=True)
    subprocess.run(['python3.11', '-m', 'venv', venv], check=True)
    subprocess.run([py, '-m', 'pip', 'install', '-q', 'torch==2.13.0', 'numpy'], check=True)
  return py


def run_nanogpt(nanogpt_dir: str, py: str, data: str) -> tuple[float, float]:
  out = subprocess.run(['bash', os.path.join(nanogpt_dir, 'run.sh'), py, data],
                       capture_output=True, text=True, check=True).stdout
  m = re.search(r'([\d.]+) s wall; full val: [\d.]+ nats/char = ([\d.]+) bits/char', out)
  if not m:
    raise SystemExit(f'nanoGPT run.sh printed no result: {out[-500:]}')
  return float(m.group(1)), float(m.group(2))


def run_llmjax(variant: str, data: str) -> tuple[float, float]:
  spec = 'experiments/shakespeare_char.py' + (f':{variant}' if variant else '')
  with tempfile.TemporaryDirectory() as workdir:
    began = time.monotonic()
    subprocess.run([sys.executable, '-m', 'llmjax.main', f'--config={spec}', f'--workdir={workdir}',
                    f'--config.data.path={os.path.abspath(data)}'], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    wall = time.monotonic() - began
    rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return wall, rows[-1]['eval_bits_per_char']


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data', required=True, help='the Tiny Shakespeare text file')
  p.add_argument('--torch_python', default='')
  p.add_argument('--nanogpt_dir', default=os.path.join(ROOT, '..', 'shared', 'bench', 'nanogpt'),
                 help="nanoGPT's checkout with its CPU recipe (run.sh); '' runs llmjax's side only")
  p.add_argument('--rounds', type=int, default=1)
  p.add_argument('--variants', default=',long',
                 help="the config args to run, comma-separated: variant names ('' = the default) or"
                      " one key=value each (e.g. steps=20, a smoke test)")
  a = p.parse_args()
  if not os.path.isfile(a.data):
    raise SystemExit(f'--data={a.data} is not a file; pass the Tiny Shakespeare text.')
  a.data = os.path.abspath(a.data)  # run.sh reads it from its own scratch directory
  if a.nanogpt_dir and not os.path.isfile(os.path.join(a.nanogpt_dir, 'run.sh')):
    raise SystemExit(f"--nanogpt_dir={a.nanogpt_dir} has no run.sh (nanoGPT and its recipe); "
                     "--nanogpt_dir='' runs llmjax's side only.")
  py = torch_python(a.torch_python) if a.nanogpt_dir else ''
  entries = [('nanoGPT baby GPT (CPU recipe)', None)] * bool(a.nanogpt_dir) + [
      (f"llmjax shakespeare_char.py{':' + v if v else ''}", v) for v in a.variants.split(',')]
  results = {name: [] for name, _ in entries}
  for r in range(a.rounds):
    for name, variant in entries:
      res = run_nanogpt(a.nanogpt_dir, py, a.data) if variant is None else run_llmjax(variant,
                                                                                      a.data)
      results[name].append(res)
      print(f'round {r + 1}: {name}: {res[0]:.1f} s wall, {res[1]:.4f} bits/char', flush=True)
  print(f"\n| run | wall s | bits/char (whole validation split) |\n|---|---|---|")
  for name, res in results.items():
    wall = statistics.median(w for w, _ in res)
    bpc = statistics.median(b for _, b in res)
    print(f'| {name} | {wall:.1f} | {bpc:.4f} |')


if __name__ == '__main__':
  main()
