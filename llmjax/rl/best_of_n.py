"""Rejection-sampling fine-tuning, step 1: best-of-n completions as SFT data.

    python -m llmjax.rl.best_of_n --workdir=SFT_RUN --tasks=arithmetic --n=8 --out=best.jsonl
    python -m llmjax.rl.best_of_n --hf=HF_DIR --data=prompts.jsonl \
        --reward_fns=my_rewards:correct --n=16 --min_reward=1 --out=best.jsonl
    python -m llmjax.main --config=experiments/sft.py --workdir=W --config.init.hf_dir=HF_DIR \
        --config.data.path=best.jsonl                   # step 2: the ordinary SFT step

Samples n completions of every prompt with the generation engine (the rollouts of online RL,
`llmjax.rl.rollout`: per-row seeds, the same seed gives the same file), scores them with the
reward functions (`llmjax.rl.rewards`, weighted), and writes the best of each prompt (the first
of equal ones) as a `data.format='prompt_completion'` record {"prompt", "completion", "reward"}
plus the prompt record's other fields, keeping only those whose reward is at least
--min_reward. The SFT pipeline appends EOS to each completion, so the model also learns to stop
where the chosen sample did (a completion cut at --max_new_tokens is dropped, it never ended,
unless --keep_truncated).
Prompts are --tasks' train splits (built-in tasks, their `answer` feeding exact_match) or a
JSONL file of records with a `prompt` field.
"""

import json
import sys

import numpy as np

from llmjax import cli, files
from llmjax.errors import UserError

FLAGS = (
    cli.Flag('workdir', '', 'an llmjax run to sample from (its latest checkpoint)', metavar='DIR'),
    cli.Flag('hf', '', 'or a Hugging Face checkpoint dir', metavar='HF_DIR'),
    cli.Flag('data', '', 'prompts: a JSONL file of {"prompt", ...} records', metavar='FILE'),
    cli.Flag('tasks', '', "or built-in tasks' train prompts, comma-separated (e.g. arithmetic)",
             metavar='NAME,NAME'),
    cli.Flag('reward_fns', 'exact_match', "reward functions: built-ins or module:function,"
             " comma-separated", metavar='FN,FN'),
    cli.Flag('reward_weights', '', 'their weights, comma-separated; default 1 each',
             metavar='W,W'),
    cli.Flag('n', 8, 'completions sampled per prompt'),
    cli.Flag('temperature', 1.0, 'sampling temperature (> 0)'),
    cli.Flag('top_p', 1.0, 'nucleus sampling'),
    cli.Flag('max_new_tokens', 64, 'tokens per completion at most'),
    cli.Flag('min_reward', float('-inf'), "keep a prompt's best only when its reward is at least"
             ' this'),
    cli.Flag('keep_truncated', False, 'also keep completions cut at --max_new_tokens (they teach'
             ' no stop: the SFT step appends an EOS the model never chose)'),
    cli.Flag('max_prompts', 0, 'only the first N prompts (0: all)'),
    cli.Flag('batch_size', 64, 'completions sampled at once'),
    cli.Flag('seed', 0, 'the sampling seed'),
    cli.Flag('out', '', 'the JSONL file to write (local or gs://)', metavar='FILE'),
)


def prompt_records(flags) -> list[dict]:
  if bool(flags['data']) == bool(flags['tasks']):
    raise UserError("pass one of --data=FILE.jsonl (records with a prompt) or --tasks=NAME,NAME.")
  if flags['tasks']:
    from llmjax.data import tasks
    names = tasks.check_task_names([n for n in flags['tasks'].split(',') if n], where='--tasks')
    return [{'prompt': r['prompt'], 'answer': r['answer'], 'task': name}
            for name in names for r in tasks.make_task(name, 'train')]
  from llmjax.eval.records import read_jsonl
  out = []
  for n, rec in read_jsonl(flags['data']):
    if not isinstance(rec.get('prompt'), str):
      raise UserError(f"{flags['data']}:{n}: a record needs a string 'prompt' field.")
    out.append(rec)
  return out


def best_of_n(cfg, params, tokenizer, records: list[dict], fns, weights, *, n: int,
              sampling, seed: int = 0, batch_size: int = 64, min_reward: float = float('-inf'),
              keep_truncated: bool = False, progress=None) -> list[dict]:
  """The best of n sampled completions of each record's prompt, as SFT records."""
  from llmjax.eval.harness import eos_ids, prompt_ids
  from llmjax.rl import rollout, rewards as rewards_lib
  from llmjax.rl.loop import columns
  ids = prompt_ids(tokenizer, [r['prompt'] for r in records])
  room = cfg.max_seq_len - sampling.max_new_tokens
  per = max(batch_size // n, 1)
  out = []
  for start in range(0, len(records), per):
    recs, batch_ids = records[start:start + per], ids[start:start + per]
    for i, p in enumerate(batch_ids):
      if len(p) > room:
        raise UserError(f"prompt {start + i} is {len(p)} tokens, more than the model context"
                        f" {cfg.max_seq_len} minus --max_new_tokens={sampling.max_new_tokens}.")
    roll = rollout.sample(cfg, params, batch_ids, num_generations=n, sampling=sampling,
                          eos_ids=eos_ids(tokenizer), decode=tokenizer.decode, seed=seed + start)
    prompts = [r['prompt'] for r in recs for _ in range(n)]
    scores = rewards_lib.score(fns, prompts, roll.texts, columns(recs, n)) @ weights
    # A completion that never ended (cut at max_new_tokens) is no example of where to stop.
    if not keep_truncated:
      scores = np.where(roll.truncated, -np.inf, scores)
    scores = scores.reshape(-1, n)
    for j, rec in enumerate(recs):
      best = int(np.argmax(scores[j]))
      if np.isfinite(scores[j, best]) and scores[j, best] >= min_reward:
        out.append({**rec, 'completion': roll.texts[j * n + best],
                    'reward': float(scores[j, best])})
    if progress:
      progress(min(start + per, len(records)), len(records))
  return out


def main(argv: list[str]) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  flags = cli.parse(argv, FLAGS, prog='llmjax.rl.best_of_n', doc=__doc__)
  if bool(flags['workdir']) == bool(flags['hf']):
    raise UserError("pass one of --workdir=DIR or --hf=HF_DIR.")
  if not flags['out']:
    raise UserError("missing --out=FILE.jsonl: where the best completions go.")
  if flags['n'] < 2:
    raise UserError(f"--n={flags['n']}: best-of-n needs at least 2 samples per prompt.")
  if flags['temperature'] <= 0:
    raise UserError(f"--temperature={flags['temperature']} must be > 0: greedy samples are"
                    " all the same.")
  from llmjax.infer import engine
  from llmjax.rl import rewards as rewards_lib
  weights = [float(w) for w in flags['reward_weights'].split(',') if w]
  fns, weights = rewards_lib.load(flags['reward_fns'], weights)
  records = prompt_records(flags)
  if flags['max_prompts']:
    records = records[:flags['max_prompts']]
  sampling = engine.SamplingParams(max_new_tokens=flags['max_new_tokens'],
                                   temperature=flags['temperature'],
                                   top_p=flags['top_p']).validate()
  from llmjax.generate import load
  cfg, params, tokenizer = load({'workdir': flags['workdir'], 'hf': flags['hf'], 'peft': ''})
  kept = best_of_n(cfg, params, tokenizer, records, fns, weights, n=flags['n'],
                   sampling=sampling, seed=flags['seed'], batch_size=flags['batch_size'],
                   min_reward=flags['min_reward'], keep_truncated=flags['keep_truncated'],
                   progress=lambda i, t: print(f"\r{i}/{t} prompts", end='', file=sys.stderr))
  print(file=sys.stderr)
  files.write_text(flags['out'], ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in kept))
  mean = np.mean([r['reward'] for r in kept]) if kept else float('nan')
  print(f"wrote {flags['out']}: {len(kept)} of {len(records)} prompts kept (best of"
        f" {flags['n']}, mean reward {mean:.3f})")
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
