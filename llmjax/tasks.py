"""Write the built-in instruction tasks (llmjax.data.tasks) as JSONL files for SFT and eval.

    python -m llmjax.tasks --out=DIR [--tasks=arithmetic,facts] [--seed=0]
                           [--format=prompt_completion|messages|preference]

writes DIR/<task>/train.jsonl and DIR/<task>/heldout.jsonl, no prompt of heldout in train.
Tasks: arithmetic (What is 12 + 7?), facts (about the embedded corpus's world), strings
(reverse, upper-case, count, first letter of a word), format (those questions answered as JSON
{"answer": ...}). --format=prompt_completion (the default) writes
{"prompt": "Q: What is 12 + 7?\\nA:", "completion": " 19", "answer": "19"} records, for
data.format='prompt_completion'; --format=messages writes {"messages": [{"role": "user",
"content": "What is 12 + 7?"}, {"role": "assistant", "content": "19"}], "answer": "19"}, for
data.format='messages'; --format=preference writes {"prompt": "Q: What is 12 + 7?\\nA:",
"chosen": " 19", "rejected": " 21", "answer": "19"} (chosen the correct answer, rejected a
plausible wrong or badly formatted one; `llmjax.data.tasks.preference_pairs`), for
data.format='preference'. `answer` is what exact match compares the generated text with.

    python -m llmjax.tasks --out=/tmp/tasks --tasks=arithmetic
    python -m llmjax.main --config=experiments/quickstart.py --workdir=/tmp/sft \\
        --config.data.path=/tmp/tasks/arithmetic/train.jsonl --config.data.format=prompt_completion
"""

import sys

from llmjax import cli

FLAGS = (
    cli.Flag('out', '', 'the directory to write <task>/train.jsonl and <task>/heldout.jsonl into'
             ' (local or gs://)', metavar='DIR'),
    cli.Flag('tasks', 'arithmetic,facts,strings,format', 'the tasks to write, comma-separated',
             metavar='NAME,NAME'),
    cli.Flag('seed', 0, 'which problems go to which split, and their order'),
    cli.Flag('format', 'prompt_completion', "the records: 'prompt_completion' (prompt,"
             " completion, answer), 'messages' (a user/assistant conversation, answer) or"
             " 'preference' (prompt, chosen, rejected, answer)",
             metavar='FORMAT'),
)


def main(argv: list[str]) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  flags = cli.parse(argv, FLAGS, prog='llmjax.tasks', doc=__doc__)
  from llmjax.data import tasks  # after --help: `llmjax.data` pulls in Grain
  from llmjax.errors import UserError
  if not flags['out']:
    raise UserError("missing --out=DIR: where <task>/train.jsonl and <task>/heldout.jsonl go.")
  names = [n.strip() for n in flags['tasks'].split(',') if n.strip()]
  written = tasks.write_tasks(flags['out'], names, seed=flags['seed'],
                              file_format=flags['format'])
  for name, paths in written.items():
    sizes = ', '.join(f"{split} {len(tasks.make_task(name, split, flags['seed']))}"
                      for split in paths)
    print(f"{name}: {paths['train']}, {paths['heldout']} ({sizes} records)")
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
