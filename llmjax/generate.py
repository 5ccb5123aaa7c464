"""Sample from a trained workdir or a Hugging Face checkpoint directory.

    python -m llmjax.generate --workdir=/tmp/quickstart --prompt="Once upon a time"
    python -m llmjax.generate --workdir=gs://BUCKET/run --prompt="Once upon a time"
    python -m llmjax.generate --hf=HF_DIR --prompt_ids=1,2,3 --json --temperature=0
    python -m llmjax.generate --hf=BASE_DIR --peft=ADAPTER_DIR --prompt="Once upon a time"

Flags: --prompt (repeatable), --prompt_ids=1,2,3 (token ids, no BOS added), --max_new_tokens=64,
--temperature=0.8 (0: greedy), --top_k=0, --top_p=1.0, --min_p=0, --repetition_penalty=1,
--presence_penalty=0, --frequency_penalty=0, --no_repeat_ngram_size=0 (transformers'
definitions and order: llmjax/infer/processors.py), --seed=0, --stop=STRING (repeatable;
decoding stops at it), --json (print {"prompt_ids", "ids", "text"} per prompt instead of text),
--logprobs=K (with --json: also "logprobs", each token's log-prob under the model, and
"top_logprobs", the K most likely [id, log-prob] at each step; 0: only the token's),
--num_beams=1 (beam search with temperature 0: transformers' definitions, llmjax/infer/beam.py),
--length_penalty=1 (beam score = sum log-prob / generated length ** length_penalty),
--early_stopping=false (true, false or never), --num_return_sequences=1 (best beams printed per
prompt; with --json one line per sequence with its "beam" rank and "score"),
--chat (each prompt is a user message rendered with the chat template, the reply is printed;
the template of a run's data.chat_template, else the tokenizer's), --system=TEXT (with --chat).

    python -m llmjax.generate --workdir=/tmp/sft --chat --prompt="What is the capital of Peru?"
"""

import json
import sys

from llmjax import cli
from llmjax.errors import UserError

def sampling_flags(*, max_new_tokens: int, temperature: float, seed: str,
                   stop: str) -> tuple:
  """The sampling flags every sampling CLI takes (generate, chat), with its own defaults and
  help for the seed and the stop strings."""
  return (
      cli.Flag('max_new_tokens', max_new_tokens, 'tokens to generate per prompt at most'),
      cli.Flag('temperature', temperature, 'sampling temperature; 0: greedy'),
      cli.Flag('top_k', 0, 'sample from the k most likely tokens; 0: all'),
      cli.Flag('top_p', 1.0, 'nucleus sampling: the smallest set of tokens with this much'
               ' probability; 1: all'),
      cli.Flag('min_p', 0.0, 'drop tokens less likely than min_p times the most likely; 0: off'),
      cli.Flag('repetition_penalty', 1.0, 'divide the (positive) logits of tokens already in'
               ' the prompt or output by this; 1: off'),
      cli.Flag('presence_penalty', 0.0, "OpenAI's: subtract this from the logits of tokens in"
               ' the output; in [-2, 2]'),
      cli.Flag('frequency_penalty', 0.0, "OpenAI's: subtract this times each token's count in"
               ' the output; in [-2, 2]'),
      cli.Flag('no_repeat_ngram_size', 0, 'never repeat an n-gram of this size; 0: off'),
      cli.Flag('seed', 0, seed),
      cli.Flag('stop', [], stop, metavar='STRING'),
  )


def sampling_params(flags):
  """The SamplingParams of the sampling flags; a one-line UserError naming the flag for a
  value out of range (checked before anything loads or compiles)."""
  import dataclasses
  from llmjax.infer.engine import SamplingParams, parse_early_stopping
  # A flag a caller's dict lacks (a program building the flags by hand) keeps its default.
  kwargs = {f.name: flags[f.name] for f in dataclasses.fields(SamplingParams) if f.name in flags}
  if 'early_stopping' in kwargs:
    kwargs['early_stopping'] = parse_early_stopping(kwargs['early_stopping'])
  return SamplingParams(**kwargs).validate()


BEAM_FLAGS = (
    cli.Flag('num_beams', 1, 'beam search with this many beams (needs --temperature=0); 1: off'),
    cli.Flag('length_penalty', 1.0, 'beam score = sum log-prob / generated length ** this;'
             ' > 0 favours longer sequences'),
    cli.Flag('early_stopping', 'false', "beam search stops once num_beams hypotheses finished"
             " (true), when no better one is likely (false), or when none can be (never)",
             metavar='true|false|never'),
    cli.Flag('num_return_sequences', 1, 'best beams printed per prompt, <= --num_beams'),
)


FLAGS = (
    cli.Flag('workdir', '', 'an llmjax run to sample from (local or gs://): its latest'
             ' checkpoint, LoRA adapters merged, and its tokenizer', metavar='DIR'),
    cli.Flag('hf', '', 'or a Hugging Face checkpoint dir (config.json + safetensors)',
             metavar='HF_DIR'),
    cli.Flag('peft', '', 'with --hf: a PEFT LoRA adapter dir over that base (merged into it)',
             metavar='ADAPTER_DIR'),
    cli.Flag('prompt', [], 'a prompt text (BOS added when the tokenizer has one)',
             metavar='TEXT'),
    cli.Flag('prompt_ids', '', 'or one prompt as comma-separated token ids (no BOS added)',
             metavar='1,2,3'),
    *sampling_flags(max_new_tokens=64, temperature=0.8, seed='random seed of the sampling',
                    stop='cut the printed text where this string first appears'),
    *BEAM_FLAGS,
    cli.Flag('json', False, 'print {"prompt_ids", "ids", "text"} per prompt instead of text'),
    cli.Flag('logprobs', -1, 'with --json, each token\'s log-prob under the model and the K most'
             ' likely tokens\' ("logprobs", "top_logprobs"); 0: the token\'s only; -1: none',
             metavar='K'),
    cli.Flag('chat', False, "each prompt is a user message rendered with the chat template (the"
             " run's data.chat_template, else the tokenizer's); the reply is printed"),
    cli.Flag('system', '', 'a system message before each prompt (with --chat)', metavar='TEXT'),
)


def parse_flags(argv: list[str]) -> dict:
  """argv -> {flag: value}; a missing or contradictory choice is a one-line UserError."""
  flags = cli.parse(argv, FLAGS, prog='llmjax.generate', doc=__doc__)
  if bool(flags['workdir']) == bool(flags['hf']):
    raise UserError("pass exactly one of --workdir=DIR (an llmjax run) or --hf=HF_DIR.")
  if flags['peft'] and not flags['hf']:
    raise UserError("--peft=ADAPTER_DIR needs its base as --hf=BASE_DIR (a LoRA run's --workdir"
                    " holds its adapters already).")
  if not flags['prompt'] and not flags['prompt_ids']:
    raise UserError("pass --prompt=TEXT (repeatable) or --prompt_ids=1,2,3.")
  if flags['chat'] and flags['prompt_ids']:
    raise UserError("--chat renders --prompt texts; it cannot take --prompt_ids.")
  if flags['system'] and not flags['chat']:
    raise UserError("--system needs --chat.")
  sp = sampling_params(flags)
  from llmjax.infer.engine import check_stop
  check_stop(flags['stop'])
  if sp.num_beams > 1 and flags['logprobs'] >= 0:
    raise UserError("--logprobs: beam search returns each sequence's score, not log-probs;"
                    " drop --logprobs or --num_beams.")
  if flags['logprobs'] < -1:
    raise UserError(f"--logprobs={flags['logprobs']}: must be -1 (none), 0 (each token's) or"
                    " K > 0 (also the K most likely).")
  if flags['logprobs'] >= 0 and not flags['json']:
    raise UserError("--logprobs needs --json (the log-probs are printed in the JSON lines).")
  return flags


def chat_template(flags, tokenizer):
  """The chat template to prompt with: the run's (WORKDIR/chat_template.jinja, its
  data.chat_template), else the tokenizer's; a one-line UserError when there is none or it has
  no assistant marker. Needs only the tokenizer (`load_tokenizer`), not the params."""
  from llmjax import files
  from llmjax.data import chat
  where = flags.get('hf') or flags['workdir']
  if tokenizer is None:
    raise UserError(f"{where} has no tokenizer.json or"
                    " tokenizer.model; a chat needs one to render its messages.")
  run_template = files.join(flags['workdir'], chat.RUN_TEMPLATE) if flags['workdir'] else ''
  if run_template and files.exists(run_template):
    template = chat.ChatTemplate(files.read_text(run_template), tokenizer, run_template)
  elif getattr(tokenizer, 'chat_template', None):
    template = chat.ChatTemplate(tokenizer.chat_template, tokenizer,
                                 f"the chat template of {where}")
  else:
    raise UserError("--chat: this model has no chat template (no data.chat_template in its run,"
                    " none in its tokenizer); drop --chat to continue plain text.")
  template.check_assistant_marker()
  return template


def chat_prompts(flags, tokenizer, template=None) -> list[list[int]]:
  """--prompt texts as user turns (after --system) rendered with the run's chat template."""
  template = template or chat_template(flags, tokenizer)
  system = [{'role': 'system', 'content': flags['system']}] if flags['system'] else []
  return [template.prompt_ids(system + [{'role': 'user', 'content': p}])
          for p in flags['prompt']]


def load_tokenizer(flags):
  """The tokenizer of --workdir or --hf alone, without the params (None: --hf has none)."""
  if flags['hf']:
    from llmjax.interop.tokenizer import load_tokenizer as load_hf_tokenizer
    return load_hf_tokenizer(flags['hf'])
  from llmjax.data.pipeline import load_run_tokenizer
  return load_run_tokenizer(flags['workdir'])


def load(flags, tokenizer=None):
  """(ModelConfig, params, tokenizer) from --workdir or --hf; `tokenizer`: one already loaded
  by `load_tokenizer`, not read again for a workdir."""
  from llmjax.models import lora
  if flags['hf'] and flags.get('peft'):
    from llmjax.interop import peft
    cfg, params, tokenizer = peft.load_hf_with_adapter(flags['hf'], flags['peft'])
    params, cfg = lora.merge(params, cfg)  # one matmul per projection when decoding
    return cfg, params, tokenizer
  if flags['hf']:
    from llmjax.interop import load_hf
    return load_hf(flags['hf'])
  from llmjax.train import checkpoint
  workdir = flags['workdir']
  cfg = checkpoint.read_model_config(workdir)
  params, _ = checkpoint.restore_params(workdir)
  params, cfg = lora.merge(params, cfg)  # one matmul per projection when decoding
  return cfg, params, tokenizer or load_tokenizer(flags)


def stop_ids(tokenizer) -> tuple[int, ...]:
  """Every stop id of the checkpoint's generation_config (HF tokenizers), else the EOS piece."""
  return tuple(getattr(tokenizer, 'eos_ids', None) or [getattr(tokenizer, 'eos_id', -1)])


def main(argv: list[str]) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  flags = parse_flags(argv)
  from llmjax.infer import engine, sampler
  template = tokenizer = None
  if flags['chat']:  # a missing or unusable template fails here, before the params load
    tokenizer = load_tokenizer(flags)
    template = chat_template(flags, tokenizer)
  cfg, params, tokenizer = load(flags, tokenizer)
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
    prompts = chat_prompts(flags, tokenizer, template)
  else:
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else []
    prompts = [bos + tokenizer.encode(p) for p in flags['prompt']]
  if flags['logprobs'] > cfg.vocab_size:
    raise UserError(f"--logprobs={flags['logprobs']}: larger than the vocabulary"
                    f" ({cfg.vocab_size}).")
  sp = sampling_params(flags)
  if sp.num_beams > 1:
    from llmjax.infer import beam
    beam.check(cfg, sp)  # before anything compiles
  decode = tokenizer.decode if tokenizer is not None else None
  stop = flags['stop'] if decode else []  # ids only: no text to find a stop string in
  if sp.num_beams > 1:
    stop = []  # beams run to their end; the printed text is still cut at a stop string
  per_prompt = sp.num_return_sequences if sp.num_beams > 1 else 1
  if sp.max_new_tokens == 0:
    engine.check_prompts(cfg, prompts, 0)
    outs = [engine.Completion([], 'length', [], []) for _ in prompts for _ in range(per_prompt)]
  else:
    outs = engine.generate(cfg, params, prompts, sp, eos_id=stop_ids(tokenizer),
                           seeds=flags['seed'], stop=stop, decode=decode,
                           logprobs=flags['logprobs'] if flags['logprobs'] >= 0 else None)
  for i, c in enumerate(outs):
    prompt = prompts[i // per_prompt]
    ids = c.ids
    if tokenizer is None:  # ids only: nothing to decode with
      text = None
    else:
      text = sampler.cut_at_stop(tokenizer.decode(ids), flags['stop'])
    if flags['json']:
      line = {'prompt_ids': prompt, 'ids': ids, 'text': text}
      if sp.num_beams > 1:
        line['beam'], line['score'] = i % per_prompt, c.score
      if flags['logprobs'] >= 0:
        line['logprobs'] = c.logprobs
        line['top_logprobs'] = [[[i, lp] for i, lp in top] for top in c.top_logprobs]
      print(json.dumps(line))
    elif text is None:
      print(' '.join(map(str, ids)))
    elif flags['chat']:  # the reply; the rendered prompt is template markup
      print(text)
    else:
      print(tokenizer.decode(prompt) + text)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
