"""Sample from a trained workdir or a Hugging Face checkpoint directory.

    python -m llmjax.generate --workdir=/tmp/quickstart --prompt="Once upon a time"
    python -m llmjax.generate --workdir=gs://BUCKET/run --prompt="Once upon a time"
    python -m llmjax.generate --hf=HF_DIR --prompt_ids=1,2,3 --json --temperature=0

Flags: --prompt (repeatable), --prompt_ids=1,2,3 (token ids, no BOS added), --max_new_tokens=64,
--temperature=0.8 (0: greedy), --top_k=0, --top_p=1.0, --seed=0, --stop=STRING (repeatable),
--json (print {"prompt_ids", "ids", "text"} per prompt instead of text),
--chat (each prompt is a user message rendered with the chat template, the reply is printed;
the template of a run's data.chat_template, else the tokenizer's), --system=TEXT (with --chat).

    python -m llmjax.generate --workdir=/tmp/sft --chat --prompt="What is the capital of Peru?"
"""

import json
import sys

from llmjax.errors import UserError

FLAGS = {'workdir': '', 'hf': '', 'prompt': [], 'prompt_ids': '', 'max_new_tokens': 64,
         'temperature': 0.8, 'top_k': 0, 'top_p': 1.0, 'seed': 0, 'stop': [], 'json': False,
         'chat': False, 'system': ''}


def parse_flags(argv: list[str]) -> dict:
  from llmjax.errors import closest
  flags = {k: (list(v) if isinstance(v, list) else v) for k, v in FLAGS.items()}
  for a in argv:
    name, eq, value = a.lstrip('-').partition('=')
    if not a.startswith('--') or name not in FLAGS:
      raise UserError(f"unknown flag '{a}'.{closest(name, FLAGS)} Flags: "
                      + ', '.join('--' + k for k in FLAGS))
    default = FLAGS[name]
    if isinstance(default, list):
      flags[name].append(value)
    elif isinstance(default, bool):
      flags[name] = value.lower() not in ('false', '0') if eq else True
    else:
      try:
        flags[name] = type(default)(value)
      except ValueError:
        raise UserError(f"--{name}={value}: expected a {type(default).__name__}.") from None
  if bool(flags['workdir']) == bool(flags['hf']):
    raise UserError("pass exactly one of --workdir=DIR (an llmjax run) or --hf=HF_DIR.")
  if not flags['prompt'] and not flags['prompt_ids']:
    raise UserError("pass --prompt=TEXT (repeatable) or --prompt_ids=1,2,3.")
  if flags['chat'] and flags['prompt_ids']:
    raise UserError("--chat renders --prompt texts; it cannot take --prompt_ids.")
  if flags['system'] and not flags['chat']:
    raise UserError("--system needs --chat.")
  return flags


def chat_prompts(flags, tokenizer) -> list[list[int]]:
  """--prompt texts as user turns (after --system) rendered with the run's chat template."""
  from llmjax import files
  from llmjax.data import chat
  run_template = files.join(flags['workdir'], chat.RUN_TEMPLATE) if flags['workdir'] else ''
  if run_template and files.exists(run_template):
    template = chat.ChatTemplate(files.read_text(run_template), tokenizer, run_template)
  elif getattr(tokenizer, 'chat_template', None):
    template = chat.ChatTemplate(tokenizer.chat_template, tokenizer)
  else:
    raise UserError("--chat: this model has no chat template (no data.chat_template in its run,"
                    " none in its tokenizer); drop --chat to continue plain text.")
  system = [{'role': 'system', 'content': flags['system']}] if flags['system'] else []
  return [template.prompt_ids(system + [{'role': 'user', 'content': p}])
          for p in flags['prompt']]


def load(flags):
  """(ModelConfig, params, tokenizer) from --workdir or --hf."""
  if flags['hf']:
    from llmjax.interop import load_hf
    return load_hf(flags['hf'])
  from llmjax.data.pipeline import load_run_tokenizer
  from llmjax.train import checkpoint
  workdir = flags['workdir']
  cfg = checkpoint.read_model_config(workdir)
  from llmjax.models import lora
  params, _ = checkpoint.restore_params(workdir)
  params, cfg = lora.merge(params, cfg)  # one matmul per projection when decoding
  return cfg, params, load_run_tokenizer(workdir)


def main(argv: list[str]) -> int:
  try:
    flags = parse_flags(argv)
    from llmjax.infer import sampler
    cfg, params, tokenizer = load(flags)
    if flags['prompt_ids']:
      try:
        prompts = [[int(x) for x in flags['prompt_ids'].split(',')]]
      except ValueError:
        raise UserError(f"--prompt_ids={flags['prompt_ids']}: expected comma-separated ints.") from None
      bad = [i for i in prompts[0] if not 0 <= i < cfg.vocab_size]
      if bad:
        raise UserError(f"--prompt_ids: ids {bad} are outside the vocabulary [0, {cfg.vocab_size}).")
    elif tokenizer is None:
      raise UserError(f"{flags['hf']} has no tokenizer.json or tokenizer.model; pass token ids"
                      " with --prompt_ids=1,2,3 (and --json to get ids back).")
    elif flags['chat']:
      prompts = chat_prompts(flags, tokenizer)
    else:
      bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else []
      prompts = [bos + tokenizer.encode(p) for p in flags['prompt']]
    sp = sampler.SamplingParams(max_new_tokens=flags['max_new_tokens'],
                                temperature=flags['temperature'], top_k=flags['top_k'],
                                top_p=flags['top_p'])
    # Every stop id of the checkpoint's generation_config (HF tokenizers), else the EOS piece.
    eos = tuple(getattr(tokenizer, 'eos_ids', None) or [getattr(tokenizer, 'eos_id', -1)])
    outs = sampler.generate(cfg, params, prompts, sp, eos_id=eos, seed=flags['seed'])
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for prompt, ids in zip(prompts, outs):
    if tokenizer is None:  # ids only: nothing to decode with
      text = None
    else:
      text = sampler.cut_at_stop(tokenizer.decode(ids), flags['stop'])
    if flags['json']:
      print(json.dumps({'prompt_ids': prompt, 'ids': ids, 'text': text}))
    elif text is None:
      print(' '.join(map(str, ids)))
    elif flags['chat']:  # the reply; the rendered prompt is template markup
      print(text)
    else:
      print(tokenizer.decode(prompt) + text)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
