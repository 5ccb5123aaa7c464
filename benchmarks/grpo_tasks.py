"""GRPO (or RLOO: --arg=algo=rloo; PPO: --experiment=ppo) from the tiny SFT model on the built-in arithmetic task:
held-out exact match before and after (by `llmjax.eval`), the share of the SFT model's held-out errors fixed, the reward curve,
and the wall time (issue 14's end-to-end proof).

    python -m llmjax.main --config=experiments/quickstart.py --workdir=/tmp/quickstart
    python -m llmjax.main --config=experiments/sft.py:tiny --workdir=/tmp/sft_tiny
    python benchmarks/grpo_tasks.py --sft=/tmp/sft_tiny [--root=/tmp/grpo_bench] [--arg=steps=200]
    python benchmarks/grpo_tasks.py --sft=/tmp/sft_tiny --experiment=ppo --root=/tmp/ppo_bench

1. Scores the SFT model on the arithmetic held-out split (200 sums; `python -m llmjax.eval
   --task=generate`, greedy, stopped at the answer line's end, as the train loop scores them).
2. Runs `experiments/EXPERIMENT.py:tiny,params_dir=SFT[,ARG]` (grpo or ppo), timed from the command's start to its
   exit (compilation, rollouts, evals and checkpoints included).
3. Scores the GRPO run the same way; prints a Markdown table and the logged reward per
   log step, and writes ROOT/results.json and ROOT/grpo/reward_curve.png (the run's).
"""

import argparse
import json
import os
import sys

from sft_tasks import run, timed_train

TASK = 'arithmetic'


def heldout(workdir: str, root: str, label: str) -> tuple[int, int]:
  from llmjax.data import tasks
  files = tasks.write_tasks(os.path.join(root, 'tasks'), (TASK,))
  log = os.path.join(root, f'eval_{label}.json')
  run(['-m', 'llmjax.eval', f'--workdir={workdir}', '--task=generate',
       f'--data={files[TASK]["heldout"]}', '--stop=\n', '--max_new_tokens=8', '--json'], log)
  recs = json.loads(open(log).read().strip().splitlines()[-1])['records']
  return sum(r['correct'] for r in recs), len(recs)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sft', default='/tmp/sft_tiny', help='the tiny SFT run (workdir)')
  p.add_argument('--root', default='/tmp/grpo_bench')
  p.add_argument('--experiment', default='grpo', choices=('grpo', 'ppo'),
                 help='experiments/grpo.py:tiny (GRPO, RLOO) or experiments/ppo.py:tiny')
  p.add_argument('--arg', default='', help='more EXPERIMENT.py:tiny arguments (k=v,...)')
  p.add_argument('--reuse', action='store_true',
                 help='keep a run already finished under ROOT (its recorded time)')
  args = p.parse_args()
  root, sft = os.path.abspath(args.root), os.path.abspath(args.sft)
  if not os.path.exists(os.path.join(sft, 'model_config.json')):
    sys.exit(f"{sft} holds no SFT run: run experiments/sft.py:tiny first (or pass --sft).")
  os.makedirs(root, exist_ok=True)
  before = heldout(sft, root, 'sft')
  experiment = (f'{args.experiment}.py:tiny,params_dir={sft}'
                + (f',{args.arg}' if args.arg else ''))
  seconds = timed_train(root, args.experiment, experiment, args.reuse)
  work = os.path.join(root, args.experiment)
  after = heldout(work, root, args.experiment)
  rows = [json.loads(l) for l in open(os.path.join(work, 'metrics.jsonl'))]
  curve = [(r['step'], r['reward']) for r in rows if 'reward' in r]
  evals = [(r['step'], r[f'eval_{TASK}_exact_match']) for r in rows
           if f'eval_{TASK}_exact_match' in r]
  errors = before[1] - before[0]
  fixed = (after[0] - before[0]) / errors if errors else float('nan')
  results = {'before': before, 'after': after, 'fixed_share': fixed, 'seconds': seconds,
             'reward': curve, 'evals': evals, 'experiment': experiment}
  with open(os.path.join(root, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  algo = json.load(open(os.path.join(work, 'config.json')))['train']['objective'].upper()
  print(f"| held-out {TASK} exact match | SFT model | after {algo} ({seconds:.0f} s) |")
  print('|---|---|---|')
  print(f"| correct | {before[0] / before[1]:.3f} ({before[0]}/{before[1]}) |"
        f" {after[0] / after[1]:.3f} ({after[0]}/{after[1]}) |")
  print(f"| errors | {errors} | {after[1] - after[0]} ({fixed:.0%} of the SFT model's fixed) |")
  print()
  first, last = curve[:5], curve[-5:]
  print('reward (mean of each rollout batch) at the first and last log steps: '
        + ', '.join(f'{s}: {r:.3f}' for s, r in first) + ' ... '
        + ', '.join(f'{s}: {r:.3f}' for s, r in last))
  print('held-out exact match logged at evals: ' + ', '.join(f'{s}: {v:.3f}' for s, v in evals))
  print(f"curve: {os.path.join(work, 'reward_curve.png')}")


if __name__ == '__main__':
  main()
