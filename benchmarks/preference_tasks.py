"""DPO and a reward model from the tiny SFT model on the built-in preference pairs: held-out
rewards/accuracies and exact match before and after DPO, the reward model's held-out accuracy,
and the wall time of each run (issue 12's end-to-end proof).

    python benchmarks/sft_tasks.py --root=/tmp/sft_bench            # the SFT model first
    python benchmarks/preference_tasks.py --sft=/tmp/sft_bench/full [--root=/tmp/pref_bench]
    python benchmarks/preference_tasks.py --sft=/tmp/sft_bench/full --runs=reward   # one of them

1. `experiments/dpo.py:tiny,params_dir=SFT` (the SFT model is the policy's start and its
   frozen reference): held-out eval_rewards/accuracies, and the tasks' exact match, logged by
   the train loop at its evals; "before" is the SFT run's last logged exact match.
2. `experiments/reward.py:tiny,params_dir=SFT`: the reward model's held-out eval_accuracy
   (chosen scored above rejected), and per task (`python -m llmjax.eval --task=reward` on each
   task's held-out pairs).
Each run is timed from the command's start to its exit (compilation, evals, checkpoints
included), one at a time. Prints a Markdown table and writes ROOT/results.json.
"""

import argparse
import json
import os
import sys

from sft_tasks import TASKS, cell as em, logged_scores, run, timed_train


def rows(workdir: str) -> list[dict]:
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def last_with(workdir: str, key: str) -> dict:
  return [r for r in rows(workdir) if key in r][-1]


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sft', default='/tmp/sft_bench/full', help='the tiny SFT run (workdir)')
  p.add_argument('--root', default='/tmp/pref_bench')
  p.add_argument('--steps', type=int, default=0, help='steps of each run (0: the variant default)')
  p.add_argument('--runs', default='dpo,reward', help='which runs: dpo, reward or both')
  p.add_argument('--reuse', action='store_true',
                 help="keep a run already finished under ROOT (its recorded time)")
  args = p.parse_args()
  root, sft = os.path.abspath(args.root), os.path.abspath(args.sft)
  if not os.path.exists(os.path.join(sft, 'model_config.json')):
    sys.exit(f"{sft} holds no SFT run: run benchmarks/sft_tasks.py first (or pass --sft).")
  os.makedirs(root, exist_ok=True)
  results = {'sft': logged_scores(sft)}
  runs = args.runs.split(',')
  if not runs or set(runs) - {'dpo', 'reward'}:
    sys.exit(f"--runs={args.runs}: name dpo, reward or both (dpo,reward).")
  for label, experiment in (('dpo', 'dpo.py:tiny'), ('reward', 'reward.py:tiny')):
    if label not in runs:
      continue
    steps = f',steps={args.steps}' if args.steps else ''
    results[f'{label}_s'] = timed_train(root, label, f'{experiment},params_dir={sft}{steps}',
                                        args.reuse)
  if 'dpo' in runs:
    dpo_dir = os.path.join(root, 'dpo')
    results['dpo'] = logged_scores(dpo_dir)
    results['dpo_evals'] = [{k: r[k] for k in r if k == 'step' or k.startswith('eval_rewards')}
                            for r in rows(dpo_dir) if 'eval_rewards/accuracies' in r]
  if 'reward' in runs:
    results['reward_evals'] = [{k: r[k] for k in ('step', 'eval_accuracy', 'eval_margin')}
                               for r in rows(os.path.join(root, 'reward'))
                               if 'eval_accuracy' in r]
    from llmjax.data import tasks
    pair_files = tasks.write_tasks(os.path.join(root, 'pairs'), TASKS, file_format='preference')
    results['reward_tasks'] = {}
    for name in TASKS:
      log = os.path.join(root, f'reward_{name}.json')
      run(['-m', 'llmjax.eval', f"--workdir={os.path.join(root, 'reward')}", '--task=reward',
           f"--data={pair_files[name]['heldout']}", '--json'], log)
      results['reward_tasks'][name] = json.loads(open(log).read().strip().splitlines()[-1])[
          'accuracy']
    sizes = {name: len(tasks.preference_pairs(name, 'heldout')) for name in TASKS}
    # All held-out pairs (eval_accuracy reads data.eval_batches batches of them).
    results['reward_all'] = (sum(results['reward_tasks'][n] * sizes[n] for n in TASKS)
                             / sum(sizes.values()))
  with open(os.path.join(root, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)

  if 'dpo' in runs:
    print_dpo(results)
  if 'reward' in runs:
    print_reward(results)


def print_dpo(results: dict) -> None:
  d = results['dpo_evals'][-1]
  print(f"| held-out | SFT model | after DPO ({results['dpo_s']:.0f} s, step {d['step']}) |")
  print('|---|---|---|')
  print(f"| rewards/accuracies | 0.00 (policy = reference) | {d['eval_rewards/accuracies']:.3f} |")
  print(f"| rewards/margins | 0.00 | {d['eval_rewards/margins']:.3f} |")
  for name in TASKS + ('',):
    print(f"| exact match {name or 'all'} | {em(results['sft'], name)} |"
          f" {em(results['dpo'], name)} |")
  print()


def print_reward(results: dict) -> None:
  r = results['reward_evals'][-1]
  print(f"reward model ({results['reward_s']:.0f} s, step {r['step']}): held-out accuracy"
        f" {r['eval_accuracy']:.3f}, mean margin {r['eval_margin']:.3f}")
  for e in results['reward_evals']:
    print(f"  step {e['step']}: eval_accuracy {e['eval_accuracy']:.3f}")
  print('  held-out accuracy by task: ' + ', '.join(
      f'{k} {v:.3f}' for k, v in results['reward_tasks'].items())
        + f"; all held-out pairs {results['reward_all']:.3f}")


if __name__ == '__main__':
  main()
