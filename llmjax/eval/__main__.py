"""Evaluate a trained workdir or a Hugging Face checkpoint on a task.

    python -m llmjax.eval --workdir=/tmp/sft --task=generate --data=heldout.jsonl --chat
    python -m llmjax.eval --hf=HF_DIR --task=multiple_choice --data=hellaswag.jsonl --json
    python -m llmjax.eval --hf=HF_DIR --task=perplexity --data=wiki.txt

Tasks and their records (other fields are ignored):
  generate         {"prompt", "answer"} (or "completion"): greedy answers (KV cache, stopped at
                   EOS or --stop), metric exact_match (texts compared after stripping whitespace).
  multiple_choice  {"context", "choices": [str, ...], "answer": int}: each choice's
                   log-likelihood as a continuation of the context, tokenized as
                   lm-evaluation-harness does (encode(context + choice), the tokens after
                   encode(context)), summed in float32; metrics acc and acc_norm (log-likelihood
                   per UTF-8 byte of the choice).
  perplexity       a text file (one document) or a .jsonl file of {"text"} records: metrics
                   perplexity (per token) and bits_per_byte (per UTF-8 byte). Each document is
                   scored as [BOS] + text, in rolling windows of the model's context.
  reward           {"prompt", "chosen", "rejected"} with a reward model (model.head='score',
                   e.g. a LlamaForSequenceClassification): each of prompt + chosen and prompt +
                   rejected tokenized as TRL's RewardTrainer does (EOS appended) and scored at
                   its last token that is not the pad token (as transformers reads it); metrics
                   accuracy (r_chosen > r_rejected), margin (mean r_chosen - r_rejected),
                   mean_reward; the records hold each pair's two rewards.
--json prints one JSON object: the metrics and `records`, one per example.
"""

import json
import sys

from llmjax import cli
from llmjax.errors import UserError, closest

TASK_NAMES = ('generate', 'multiple_choice', 'perplexity', 'reward')

FLAGS = (
    cli.Flag('workdir', '', 'an llmjax run to evaluate (local or gs://): its latest checkpoint,'
             ' LoRA adapters merged, and its tokenizer', metavar='DIR'),
    cli.Flag('hf', '', 'or a Hugging Face checkpoint dir (config.json + safetensors + tokenizer)',
             metavar='HF_DIR'),
    cli.Flag('task', '', 'generate, multiple_choice, perplexity or reward', metavar='TASK'),
    cli.Flag('data', '', 'the records: a JSONL file (perplexity: also a text file)',
             metavar='FILE'),
    cli.Flag('max_new_tokens', 32, 'generate: tokens to generate per prompt at most'),
    cli.Flag('stop', [], 'generate: cut each answer where this string first appears',
             metavar='STRING'),
    cli.Flag('chat', False, "generate: each prompt is a user message rendered with the chat"
             " template (the run's data.chat_template, else the tokenizer's)"),
    cli.Flag('system', '', 'generate: a system message before each prompt (with --chat)',
             metavar='TEXT'),
    cli.Flag('batch_size', 32, 'sequences per forward pass (or per generate call)'),
    cli.Flag('json', False, 'print one JSON object: the metrics and `records`, one per example'),
)


def parse_flags(argv: list[str]) -> dict:
  """argv -> {flag: value}; a missing or contradictory choice is a one-line UserError."""
  flags = cli.parse(argv, FLAGS, prog='llmjax.eval', doc=__doc__)
  if bool(flags['workdir']) == bool(flags['hf']):
    raise UserError("pass exactly one of --workdir=DIR (an llmjax run) or --hf=HF_DIR.")
  if not flags['task']:
    raise UserError(f"missing --task=TASK: one of {', '.join(TASK_NAMES)}.")
  if flags['task'] not in TASK_NAMES:
    raise UserError(f"--task={flags['task']} is not a task.{closest(flags['task'], TASK_NAMES)}"
                    f" Tasks: {', '.join(TASK_NAMES)}.")
  if not flags['data']:
    raise UserError("missing --data=FILE: the records to evaluate on.")
  if flags['task'] != 'generate':
    for name in ('chat', 'system', 'stop'):
      if flags[name]:
        raise UserError(f"--{name} applies to --task=generate only.")
  if flags['system'] and not flags['chat']:
    raise UserError("--system needs --chat.")
  if flags['batch_size'] < 1 or flags['max_new_tokens'] < 1:
    raise UserError("--batch_size and --max_new_tokens must be at least 1.")
  return flags


def read_data(flags) -> list:
  """The task's records, every line checked (a DataError names file and line)."""
  from llmjax.eval import records
  reader = {'generate': records.generate_records,
            'multiple_choice': records.multiple_choice_records,
            'perplexity': records.perplexity_texts,
            'reward': records.reward_records}[flags['task']]
  return reader(flags['data'])


def _progress(done: int, total: int) -> None:
  """A one-line progress bar on stderr when it is a terminal."""
  if not sys.stderr.isatty():
    return
  width = 30
  fill = width * done // max(total, 1)
  end = '\n' if done == total else ''
  print(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} batches", end=end,
        file=sys.stderr, flush=True)


def _table(task: str, metrics: dict, records: list) -> str:
  lines = [f"task {task}: {len(records)} examples"]
  for name, value in metrics.items():
    lines.append(f"  {name:<16} {value:.6g}" if isinstance(value, float) else f"  {name:<16} {value}")
  return '\n'.join(lines)


def evaluate(flags, cfg, params, tokenizer, data, template=None) -> tuple[dict, list]:
  from llmjax.eval import harness
  task, bs = flags['task'], flags['batch_size']
  if task == 'generate':
    prompts = None
    if flags['chat']:
      from llmjax.generate import chat_prompts
      prompts = chat_prompts({'workdir': flags['workdir'], 'system': flags['system'],
                              'prompt': [r['prompt'] for r in data]}, tokenizer, template)
    return harness.generate_task(cfg, params, tokenizer, data,
                                 max_new_tokens=flags['max_new_tokens'], stop=flags['stop'],
                                 prompts=prompts, batch_size=bs, progress=_progress)
  if task == 'multiple_choice':
    return harness.multiple_choice(cfg, params, tokenizer, data, batch_size=bs,
                                   progress=_progress)
  if task == 'reward':
    return harness.reward_task(cfg, params, tokenizer, data, pad_id=reward_pad_id(flags, tokenizer),
                               batch_size=bs, progress=_progress)
  return harness.perplexity(cfg, params, tokenizer, data, batch_size=bs, progress=_progress)


def reward_pad_id(flags, tokenizer) -> int:
  """The token where no reward is read: an HF checkpoint's config.json pad_token_id (what
  transformers uses; none: -1, the last token), else the run tokenizer's pad id (its pad
  token, else EOS: TRL's rule, which `llmjax.convert --to=hf` writes as pad_token_id)."""
  if flags['hf']:
    from llmjax.interop import hf
    pad = hf.read_hf_config(flags['hf']).get('pad_token_id')
    return -1 if pad is None else int(pad)
  return int(getattr(tokenizer, 'pad_id', -1))


def _model_config(flags):
  if flags['hf']:
    from llmjax.interop import hf
    return hf.config_from_hf(hf.read_hf_config(flags['hf']), f"{flags['hf']}/config.json")
  from llmjax.train import checkpoint
  return checkpoint.read_model_config(flags['workdir'])


def check_head(flags, cfg) -> None:
  """A reward model scores only --task=reward, and --task=reward needs one: one line each."""
  source = flags['hf'] or flags['workdir']
  if flags['task'] == 'reward' and cfg.head != 'score':
    raise UserError(f"--task=reward needs a reward model but {source} is a language model"
                    " (model.head='lm'); pass a *ForSequenceClassification checkpoint or a"
                    " workdir trained with model.head='score'.")
  if flags['task'] != 'reward' and cfg.head == 'score':
    raise UserError(f"{source} is a reward model (model.head='score'): it has no LM head for"
                    f" --task={flags['task']}; use --task=reward.")


def main(argv: list[str]) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  flags = parse_flags(argv)
  data = read_data(flags)  # every bad line fails here, before the model loads
  from llmjax.generate import chat_template, load, load_tokenizer
  template = None
  if flags['chat']:  # and a missing or unusable chat template (it needs only the tokenizer)
    template = chat_template(flags, load_tokenizer(flags))
  check_head(flags, _model_config(flags))  # from config.json only, before the params load
  cfg, params, tokenizer = load(flags)
  if tokenizer is None:
    raise UserError(f"{flags['hf'] or flags['workdir']} has no tokenizer (tokenizer.json or"
                    " tokenizer.model); evaluation needs one to encode the records.")
  metrics, records = evaluate(flags, cfg, params, tokenizer, data, template)
  if flags['json']:
    print(json.dumps(dict(metrics, records=records)))
  else:
    print(_table(flags['task'], metrics, records))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
