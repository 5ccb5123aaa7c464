"""SFT of the quickstart model on the built-in tasks: held-out exact match before and after,
full fine-tuning and LoRA, and the wall time of each run (issue 11's end-to-end proof).

    python benchmarks/sft_tasks.py [--root=/tmp/sft_tasks] [--steps=N] [--variants=full,lora]

1. Pretrains the quickstart model into ROOT/quickstart (skipped when it is already there):
   `python -m llmjax.main --config=experiments/quickstart.py --workdir=ROOT/quickstart`.
2. Scores it on each task's held-out split (`python -m llmjax.eval --task=generate`, greedy,
   stopped at the answer line's end, as the train loop scores built-in tasks).
3. Runs `experiments/sft.py:tiny` (full), `:tiny,lora=8` and the other adapter methods
   (`VARIANTS`) from it, each timed from the
   command's start to its exit (tokenizer, compilation, evals and checkpoints included); their
   held-out scores are those the train loop logged at the last step (metrics.jsonl).

Prints a Markdown table (per task and over all held-out records) and writes ROOT/results.json.
Runs one job at a time, so the timings are the machine's whole speed.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ('arithmetic', 'facts', 'strings')  # experiments/sft.py:tiny's data.builtin_tasks
# (label, experiments/sft.py argument): full fine-tuning, then the adapter methods at rank 8.
VARIANTS = (('full', 'tiny'), ('lora', 'tiny,lora=8'), ('dora', 'tiny,lora=8,dora=1'),
            ('qlora', 'tiny,lora=8,quant=nf4'))


def run(cmd: list[str], log: str) -> float:
  """Runs `cmd` (a python -m ... command) to completion; returns its wall seconds."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  began = time.time()
  with open(log, 'w') as f:
    r = subprocess.run([sys.executable, *cmd], stdout=f, stderr=subprocess.STDOUT, env=env,
                       cwd=ROOT_DIR)
  if r.returncode:
    sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
  return time.time() - began


def heldout_scores(workdir: str, root: str) -> dict[str, tuple[int, int]]:
  """{task: (correct, records)} of `workdir` on each held-out split, via llmjax.eval."""
  from llmjax.data import tasks
  out = {}
  files = tasks.write_tasks(os.path.join(root, 'tasks'), TASKS)
  for name in TASKS:
    log = os.path.join(root, f'eval_before_{name}.json')
    run(['-m', 'llmjax.eval', f'--workdir={workdir}', '--task=generate',
         f'--data={files[name]["heldout"]}', '--stop=\n', '--max_new_tokens=8', '--json'], log)
    recs = json.loads(open(log).read().strip().splitlines()[-1])['records']
    out[name] = (sum(r['correct'] for r in recs), len(recs))
  return out


def logged_scores(workdir: str) -> dict[str, tuple[int, int]]:
  """{task: (correct, records)} from the per-example files of the run's last eval."""
  out = {}
  for name in TASKS:
    d = os.path.join(workdir, 'eval', name)
    last = max(os.listdir(d), key=lambda f: int(f[len('step_'):-len('.jsonl')]))
    recs = [json.loads(l) for l in open(os.path.join(d, last))]
    out[name] = (sum(r['correct'] for r in recs), len(recs))
  return out


def timed_train(root: str, label: str, experiment: str, reuse: bool) -> float:
  """Runs `llmjax.main --config=experiments/EXPERIMENT --workdir=ROOT/LABEL` and returns its
  wall seconds; with `reuse`, a run already finished there keeps its recorded time."""
  workdir = os.path.join(root, label)
  timing = os.path.join(root, f'{label}_s.txt')  # written when the run has finished
  if os.path.exists(workdir) and not (reuse and os.path.exists(timing)):
    sys.exit(f"{workdir} exists: remove it (or pass another --root) to time a fresh run.")
  if not os.path.exists(workdir):
    seconds = run(['-m', 'llmjax.main', f'--config=experiments/{experiment}',
                   f'--workdir={workdir}'], os.path.join(root, f'{label}.log'))
    with open(timing, 'w') as f:
      f.write(f'{seconds}\n')
  return float(open(timing).read())


def cell(scores: dict, name: str) -> str:
  """'0.92 (184/200)': the exact match of task `name` ('' = all tasks) in `scores`."""
  c, n = scores[name] if name else (sum(v[0] for v in scores.values()),
                                    sum(v[1] for v in scores.values()))
  return f'{c / n:.2f} ({c}/{n})'


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--root', default='/tmp/sft_tasks')
  p.add_argument('--steps', type=int, default=0, help='SFT steps (0: the variant default)')
  p.add_argument('--variants', default=','.join(l for l, _ in VARIANTS),
                 help='the runs to make, comma-separated labels of VARIANTS')
  p.add_argument('--reuse', action='store_true',
                 help='keep a run already finished under ROOT (its recorded time) instead of'
                      ' refusing; remove a run\'s folder to time it again')
  args = p.parse_args()
  variants = [(l, v) for l, v in VARIANTS if l in args.variants.split(',')]
  if unknown := set(args.variants.split(',')) - {l for l, _ in VARIANTS}:
    raise SystemExit(f'--variants: unknown {sorted(unknown)}; choose from '
                     f"{','.join(l for l, _ in VARIANTS)}.")
  root = os.path.abspath(args.root)
  os.makedirs(root, exist_ok=True)
  qs = os.path.join(root, 'quickstart')
  results = {}
  if not os.path.exists(os.path.join(qs, 'model_config.json')):
    results['quickstart_s'] = run(['-m', 'llmjax.main', '--config=experiments/quickstart.py',
                                   f'--workdir={qs}'], os.path.join(root, 'quickstart.log'))
  results['before'] = heldout_scores(qs, root)
  steps = f',steps={args.steps}' if args.steps else ''
  for label, variant in variants:
    results[f'{label}_s'] = timed_train(root, label, f'sft.py:{variant},params_dir={qs}{steps}',
                                        args.reuse)
    results[label] = logged_scores(os.path.join(root, label))
  from llmjax import config as config_lib
  lora = config_lib.validate(config_lib.load_config(
      os.path.join(ROOT_DIR, f'experiments/sft.py:tiny,lora=8,params_dir={qs}')))
  results['lora_trainable_fraction'] = lora.num_lora_params / lora.num_params
  with open(os.path.join(root, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)

  heads = {'full': 'SFT full', 'lora': 'LoRA rank 8', 'dora': 'DoRA rank 8',
           'qlora': 'QLoRA rank 8 (NF4 base)'}
  print('| held-out exact match | quickstart model | '
        + ' | '.join(f"{heads[l]} ({results[f'{l}_s']:.0f} s)" for l, _ in variants) + ' |')
  print('|---' * (2 + len(variants)) + '|')
  for name in TASKS + ('',):
    print(f"| {name or 'all'} | {cell(results['before'], name)} | "
          + ' | '.join(cell(results[l], name) for l, _ in variants) + ' |')
  print(f"\nLoRA rank 8 trains {100 * results['lora_trainable_fraction']:.1f}% of the parameters.")


if __name__ == '__main__':
  main()
