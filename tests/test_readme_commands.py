"""Every command in README.md, run as written with small settings.

The README's ```bash blocks are read into commands (backslash continuations joined, `#`
comments dropped, `[...]` optional flags dropped) and its ```python blocks into snippets. Each
must have an entry in COMMANDS, keyed by its normalized text, and every entry must still be in
the README (`test_every_readme_command_has_an_entry`), so a command added, renamed or
re-flagged in the README fails here until this file says how it runs.

Each entry belongs to a group, a test that runs its commands in README order in one scratch
directory laid out as the README assumes: `experiments/` and `benchmarks/` from this checkout,
the data files the commands name (`sft.jsonl`, `chat.jsonl`, `pairs.jsonl`, ...) written by
the tests, and the checkpoints they name (`HF_DIR`, `POLICY_DIR`, `/data/Qwen2.5-0.5B`, ...)
as the test checkpoints in tests/golden. Absolute paths move into the scratch directory
(`/tmp/x` -> `tmp/x`, `/data/x` -> `data/x`, `gs://BUCKET/x` -> `BUCKET/x`: etils.epath is
the same code path for both, tests/test_files.py). An entry's `small` flags are appended (the
CLIs take the last value of a repeated flag) and its `replace` pairs edit the text; both are
the only liberties taken, and each says why. The `python3.12 -m venv` / `pip install` steps
are what .ci/run itself does before the suite (with the [test] extra, a superset), and the
test command is what .ci/run runs: those two are run by CI, not here.

llmjax's CLIs run in this process (`module.main(argv)`, as the CLIs' own tests call them),
except the long-running server and the interactive chat, which run as subprocesses; the
benchmark scripts and `curl` run as subprocesses.
"""

import contextlib
import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'golden')
README = os.path.join(ROOT, 'README.md')
PYTHONS = ('python', 'python3', 'python3.12', '.venv/bin/python')

# The README's paths that the tests provide, and where each points: test checkpoints of the
# same family as the name says (a tiny random one; nothing can be downloaded here).
CHECKPOINTS = {
    'HF_DIR': 'llama_gqa_llama3',  # Llama 3 layout, byte-level BPE (the RL tests' checkpoint)
    'ADAPTER_DIR': 'peft/llama_gqa_llama3',  # a PEFT LoRA adapter over HF_DIR
    'POLICY_DIR': 'dpo/policy',  # TRL's DPO golden policy and reference
    'REF_DIR': 'dpo/ref',
    'RM_DIR': 'reward',  # a LlamaForSequenceClassification reward model
    'data/Qwen2.5-0.5B': 'qwen2_bias_tied',  # Qwen2, tied embeddings, q/k/v biases
    'data/Meta-Llama-3-8B': 'dpo/policy',  # a Llama with a tokenizer
    'data/Qwen1.5-MoE-A2.7B': 'qwen2_moe_shared',  # Qwen2-MoE with a shared expert
}


@dataclasses.dataclass(frozen=True)
class Entry:
  group: str  # the test that runs it (commands of a group run in README order, one directory)
  why: str = ''  # what the small settings change, and why
  small: tuple[str, ...] = ()  # flags appended to the command (its last llmjax CLI)
  replace: tuple[tuple[str, str], ...] = ()  # (old, new) edits of the command's text
  ci: bool = False  # run by .ci/run (the venv, the install, the test command), not here
  optional: bool = False  # also run once with its [optional] flags
  local: bool = True  # absolute and gs:// paths moved into the scratch directory
  not_run: str = ''  # why this test cannot run it (said in the README too)


# Small settings shared by the training commands: two steps, one eval of one batch, one
# checkpoint, no long baseline. What the commands train is the README's; how long is not.
TWO_STEPS = ('--config.train.steps=2', '--config.train.log_every=1',
             '--config.train.eval_every=2', '--config.train.checkpoint_every=2',
             '--config.data.eval_batches=1', '--config.train.unigram_baseline_batches=1',
             '--config.eval.max_examples=2', '--config.eval.max_new_tokens=4')
SMALL_ROWS = ('--config.train.batch_size=4', '--config.data.seq_len=64')
QUICKSTART = 'quickstart'

COMMANDS: dict[str, Entry] = {
    # --- the first two commands ---
    'python3.12 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m llmjax.main --config=experiments/quickstart.py --workdir=workdirs/quickstart':
        Entry(QUICKSTART, 'the venv and install steps are .ci/run\'s; two steps of smaller rows',
              small=TWO_STEPS + SMALL_ROWS),
    'python3.12 -m venv .venv && .venv/bin/pip install -e \'.[test]\' && .venv/bin/python -m pytest -n 2 --durations=25 tests':
        Entry('ci', ci=True),
    '.venv/bin/python -m llmjax.generate --workdir=workdirs/quickstart --prompt="Once upon a time" --temperature=0':
        Entry(QUICKSTART, 'eight new tokens', small=('--max_new_tokens=8',)),
    # --- configs ---
    "python -m llmjax.main --config=experiments/pretrain.py:model=llama3-1b --workdir=DIR --config.train.steps=100 --config.data.path='corpus/*.jsonl' --config.model.attention=xla":
        Entry('configs', 'the tiny preset for llama3-1b (1.2B parameters do not train on a CPU test)',
              small=TWO_STEPS + SMALL_ROWS, replace=(('model=llama3-1b', 'model=tiny'),)),
    'python -m llmjax.main --config=experiments/quickstart.py --workdir=DIR --config.data.path=sft.jsonl --config.data.format=prompt_completion':
        Entry('sft_formats', small=TWO_STEPS + SMALL_ROWS),
    'python -m llmjax.main --config=experiments/quickstart.py --workdir=DIR --config.data.path=chat.jsonl --config.data.format=messages --config.data.chat_template=chatml':
        Entry('chat', small=TWO_STEPS + SMALL_ROWS),
    'python -m llmjax.generate --workdir=DIR --chat --prompt="Capital of Peru?" --stop=\'<|im_end|>\'':
        Entry('chat', small=('--max_new_tokens=8',)),
    'python -m llmjax.chat --workdir=DIR --system="Answer in one word."':
        Entry('chat', 'one typed line, then end of input', small=('--max_new_tokens=8',)),
    'python -m llmjax.main --config=experiments/llama3_8b_lora_v5e8.py --workdir=gs://BUCKET/lora --config.init.hf_dir=/data/Meta-Llama-3-8B --config.data.path=sft.jsonl':
        Entry('hf', 'a tiny Llama for the 8B (model.preset unpinned so its config.json is the '
              'architecture), XLA attention for the TPU flash kernel, whole-row loss for '
              'loss_chunk=1024 on 64-token rows',
              small=TWO_STEPS + ('--config.model.preset=', '--config.model.attention=xla',
                                 '--config.train.loss_chunk=0', '--config.train.batch_size=2',
                                 '--config.data.seq_len=64')),
    'JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan --config=experiments/llama3_8b_qlora.py --topology=v5e:1x1':
        Entry('plan'),
    'python -m llmjax.main --config=experiments/quickstart.py --workdir=/tmp/quickstart':
        Entry(QUICKSTART, 'the workdir of the quickstart above: the rerun resumes at its last step',
              replace=(('/tmp/quickstart', 'workdirs/quickstart'),), small=TWO_STEPS + SMALL_ROWS),
    'python benchmarks/quantize.py --workdir=/tmp/quickstart':
        Entry('quantize', 'four documents, one int4 group size, four new tokens',
              replace=(('/tmp/quickstart', 'workdirs/quickstart'),),
              small=('--docs=4', '--int4_groups=64', '--new_tokens=4', '--batch_size=2')),
    'python -m llmjax.main --config=experiments/sft.py --workdir=DIR --config.init.hf_dir=/data/Qwen2.5-0.5B --config.data.path=sft.jsonl':
        Entry('hf', small=TWO_STEPS + SMALL_ROWS),
    'python -m llmjax.tasks --out=tasks --tasks=arithmetic':
        Entry(QUICKSTART),
    'python -m llmjax.eval --workdir=DIR --task=generate --data=tasks/arithmetic/heldout.jsonl --json':
        Entry(QUICKSTART, 'DIR is the quickstart run; four-token answers',
              replace=(('--workdir=DIR', '--workdir=workdirs/quickstart'),),
              small=('--max_new_tokens=4',)),
    'python -m llmjax.main --config=experiments/sft.py:tiny --workdir=/tmp/sft_tiny --config.eval.tasks=hella=multiple_choice:hellaswag.jsonl,perplexity:wiki.txt':
        Entry('rl_tiny', 'from this scratch directory\'s quickstart', small=TWO_STEPS + (
            '--config.init.params_dir=tmp/quickstart', '--config.train.batch_size=4')),
    'python -m llmjax.main --config=experiments/dpo.py --workdir=W --config.init.hf_dir=POLICY_DIR --config.dpo.ref_hf_dir=REF_DIR --config.data.path=pairs.jsonl --config.data.format=preference --config.dpo.loss=robust --config.dpo.label_smoothing=0.1 --config.dpo.beta=0.3 --config.train.steps=1 --config.train.lr=0 --config.train.batch_size=8 --config.model.dtype=float32':
        Entry('hf', 'rows of 256 tokens (the pairs have at most 84)',
              small=('--config.data.seq_len=256',)),
    'python -m llmjax.main --config=experiments/reward.py --workdir=W2 --config.init.hf_dir=RM_DIR --config.data.path=pairs.jsonl --config.data.format=preference --config.train.steps=1 --config.train.lr=0 --config.train.batch_size=8 --config.model.dtype=float32':
        Entry('hf', 'rows of 256 tokens', small=('--config.data.seq_len=256',)),
    'python -m llmjax.main --config=experiments/grpo.py --workdir=W --config.init.hf_dir=HF_DIR --config.data.path=prompts.jsonl --config.rl.reward_fns=my_rewards:correct':
        Entry('hf', 'two steps of 2 prompts x 4 samples of 8 tokens; its own workdir (W is the '
              'DPO run\'s in this group)', replace=(('--workdir=W', '--workdir=W_grpo'),),
              small=TWO_STEPS + ('--config.rl.num_generations=4', '--config.train.batch_size=8',
                                 '--config.rl.max_completion_length=8',
                                 '--config.data.seq_len=64')),
    'python -m llmjax.main --config=experiments/grpo.py:tiny --workdir=/tmp/grpo_tiny':
        Entry('rl_tiny', 'two steps of 2 prompts x 4 samples of 8 tokens', small=TWO_STEPS + (
            '--config.init.params_dir=tmp/sft_tiny', '--config.rl.num_generations=4',
            '--config.train.batch_size=8', '--config.rl.max_completion_length=8')),
    # --- results ---
    'python benchmarks/sft_tasks.py --root=/tmp/sft_bench':
        Entry('results', 'ROOT/quickstart is this directory\'s two-step quickstart (the script '
              'reuses one it finds); full SFT only, two steps', small=('--steps=2',
                                                                        '--variants=full')),
    'python benchmarks/preference_tasks.py --sft=/tmp/sft_bench/full':
        Entry('results', 'from the SFT run above; two steps each, its root in this directory',
              small=('--steps=2', '--root=tmp/pref_bench')),
    'python -m llmjax.main --config=experiments/sft.py:tiny --workdir=/tmp/sft_tiny':
        Entry('results', 'from this directory\'s quickstart', small=TWO_STEPS + (
            '--config.init.params_dir=tmp/quickstart', '--config.train.batch_size=4')),
    'python benchmarks/grpo_tasks.py --sft=/tmp/sft_tiny':
        Entry('results', 'two steps of 2 prompts x 4 samples; its root in this directory',
              small=('--arg=steps=2,batch=8,generations=4', '--root=tmp/grpo_bench')),
    'python benchmarks/grpo_tasks.py --sft=/tmp/sft_tiny --arg=algo=rloo --root=/tmp/rloo_bench':
        Entry('results', 'two steps of 2 prompts x 4 samples',
              replace=(('--arg=algo=rloo', '--arg=algo=rloo,steps=2,batch=8,generations=4'),)),
    'python benchmarks/grpo_tasks.py --sft=/tmp/sft_tiny --experiment=ppo --root=/tmp/ppo_bench':
        Entry('results', 'two steps of 8 prompts', small=('--arg=steps=2,batch=8',)),
    'python benchmarks/compare.py --rounds=1':
        Entry('results', not_run='Hugging Face\'s side is ../shared/bench/peer_hf.py, the '
              'benchmark kit beside the development checkout, not part of the repository, in '
              'a torch venv that it installs (README says so)'),
    'python benchmarks/dpo_packing.py':
        Entry('results', 'one step of 4 rows per packing; its workdir in this directory',
              small=('--steps=1', '--rows=4', '--workdir=tmp/dpo_packing')),
    # --- running on a TPU VM, a GPU ---
    "pip install -e '.[tpu]'":
        Entry('plan_sft', ".ci/run installs '.[test]', which holds jax[tpu] (not gcsfs, the tpu "
              "extra's GCS client)", ci=True),
    'JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan --config=experiments/sft.py:qwen2.5-0.5b --topology=v5e:2x2':
        Entry('plan_sft'),
    'python -m llmjax.main --config=experiments/sft.py:qwen2.5-0.5b --workdir=gs://BUCKET/sft --config.init.hf_dir=/data/Qwen2.5-0.5B --config.data.path=sft.jsonl':
        Entry('hf', 'the tiny Qwen2 (model.preset unpinned), XLA attention for the TPU kernel, '
              'two steps of 64-token rows', small=TWO_STEPS + (
                  '--config.model.preset=', '--config.model.attention=xla',
                  '--config.train.loss_chunk=0', '--config.train.batch_size=2',
                  '--config.data.seq_len=64')),
    'python -m llmjax.main --config=experiments/sft.py --workdir=DIR --config.init.hf_dir=/data/Qwen2.5-0.5B --config.data.path=sft.jsonl --config.model.attention=auto --config.model.dtype=bfloat16':
        Entry('hf', "its own workdir (DIR is the other sft.py run's here); 'auto' is XLA on a "
              'CPU', small=TWO_STEPS + SMALL_ROWS, replace=(('--workdir=DIR', '--workdir=DIR_gpu'),)),
    # --- mixture of experts ---
    'python -m llmjax.convert --from=hf --src=/data/Qwen1.5-MoE-A2.7B --dst=W':
        Entry('moe'),
    'python -m llmjax.convert --to=hf --src=W --dst=OUT':
        Entry('moe'),
    # --- serving ---
    '.venv/bin/python -m llmjax.serve --workdir=workdirs/quickstart --host=127.0.0.1 --port=8000 --max_batch=32':
        Entry(QUICKSTART, 'a free port for 8000 (tests run side by side); 4 slots of 128 '
              'tokens, compiled as requests come (no warm-up)',
              small=('--max_batch=4', '--max_model_len=128', '--warmup=false')),
    '.venv/bin/python -m llmjax.serve --hf=HF_DIR --max_model_len=4096':
        Entry('serve_hf', 'a free port; the context of the test checkpoint for 4096; 4 slots, '
              'no warm-up', optional=True, small=('--max_batch=4', '--warmup=false'),
              replace=(('--max_model_len=4096', '--max_model_len=128'),)),
    'curl -s localhost:8000/v1/completions -d \'{"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0}\'':
        Entry(QUICKSTART, 'the server above, on its port'),
    "from openai import OpenAI\nclient = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none')\nclient.completions.create(model='quickstart', prompt='Once upon a time', max_tokens=30)":
        Entry(QUICKSTART, 'the server above, on its port'),
    'python benchmarks/serve.py --workdir=workdirs/quickstart':
        Entry('serve_bench', 'four requests, two at a time, 4-8 words, 4-8 tokens, 2 slots of 64',
              small=('--requests=4', '--concurrency=2', '--words=4,8', '--tokens=4,8',
                     '--max_batch=2', '--max_model_len=64')),
    'python benchmarks/serve.py --workdir=workdirs/quickstart --max_model_len=128 --words=8,24 --tokens=16,48':
        Entry('serve_bench', 'four requests, two at a time, 4-8 tokens, 2 slots',
              small=('--requests=4', '--concurrency=2', '--tokens=4,8', '--max_batch=2')),
    # --- benchmarks ---
    'python -m llmjax.main --config=experiments/shakespeare_char.py --workdir=W --config.data.path=FILE':
        Entry('shakespeare', 'FILE is input.txt, 20 KB of text', small=TWO_STEPS + SMALL_ROWS,
              replace=(('=FILE', '=input.txt'),)),
    'python -m llmjax.main --config=experiments/shakespeare_char.py:long --workdir=W --config.data.path=FILE':
        Entry('shakespeare', 'its own workdir', small=TWO_STEPS + SMALL_ROWS,
              replace=(('--workdir=W', '--workdir=W_long'), ('=FILE', '=input.txt'))),
    'python benchmarks/shakespeare.py --data=FILE':
        Entry('shakespeare', 'without nanoGPT (its recipe lives outside the repository) and with '
              'two-step variants', small=('--nanogpt_dir=', '--variants=steps=2'),
              replace=(('=FILE', '=input.txt'),)),
    # --- scaling out ---
    'JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan --config=experiments/llama3_8b_pretrain.py:tpu=v5p-8 --topology=v5p:2x2x1':
        Entry('plan'),
    'python -m llmjax.launch create --name=llama --zone=us-east5-a --accelerator=v5p-8':
        Entry('launch', '--dry-run: the gcloud commands printed, not run (no cloud here)',
              small=('--dry-run',), optional=True, local=False),
    'python -m llmjax.launch setup --name=llama --zone=us-east5-a':
        Entry('launch', '--dry-run', small=('--dry-run',)),
    "python -m llmjax.launch run --name=llama --zone=us-east5-a --config=experiments/llama3_8b_pretrain.py:tpu=v5p-8 --workdir=gs://BUCKET/llama3_8b -- --config.data.path='/data/*.jsonl'":
        Entry('launch', '--dry-run, before the -- that starts the training flags',
              replace=((' -- ', ' --dry-run -- '),), local=False),
    'python -m llmjax.launch delete --name=llama --zone=us-east5-a':
        Entry('launch', '--dry-run', small=('--dry-run',)),
}

FIRST = next(iter(COMMANDS))  # the quickstart: the quickstart_dir fixture runs it
GROUPS = sorted({e.group for e in COMMANDS.values() if not e.ci and not e.not_run})


def readme_commands(text: str) -> list[tuple[str, list[str] | None]]:
  """(key, tokens) of each command in the README's bash blocks, in order, and (snippet, None)
  for each python block."""
  out = []
  for lang, body in re.findall(r'```(\w*)\n(.*?)```', text, re.S):
    if lang == 'python':
      out.append((body.strip(), None))
      continue
    if lang != 'bash':
      continue
    for line in body.replace('\\\n', ' ').splitlines():
      tokens = shlex.split(line, comments=True)
      tokens = [t for t in tokens if not (t.startswith('[') and t.endswith(']'))]
      if tokens:
        out.append((_key(line), tokens))
  return out


def _key(line: str) -> str:
  """The command's text with runs of spaces collapsed, comments and [optional] flags dropped."""
  quote = ''
  for i, ch in enumerate(line):  # a trailing comment: a '#' after a space, outside quotes
    if quote:
      quote = '' if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch == '#' and (i == 0 or line[i - 1].isspace()):
      line = line[:i]
      break
  line = re.sub(r'\s\[[^\]]*\]', '', line)
  return re.sub(r'\s+', ' ', line).strip()


def _optional_flags(text: str, key: str) -> list[str]:
  for line in text.replace('\\\n', ' ').splitlines():
    if _key(line) == key:
      return [t[1:-1] for t in shlex.split(line, comments=True) if t.startswith('[')]
  return []


def test_every_readme_command_has_an_entry():
  text = open(README).read()
  keys = [k for k, _ in readme_commands(text)]
  missing = [k for k in keys if k not in COMMANDS]
  assert not missing, ('README commands with no entry in tests/test_readme_commands.py '
                       f'COMMANDS (add one saying how it runs): {missing}')
  stale = [k for k in COMMANDS if k not in keys]
  assert not stale, f'COMMANDS entries no longer in README.md: {stale}'
  # CI's entries are the command .ci/run reads from the README and installs, which it does.
  for k in keys:
    if COMMANDS[k].ci:
      assert k.startswith('pip install') or '-m pytest' in k, k
  # What this test cannot run is one command, said in the README.
  assert [k for k in COMMANDS if COMMANDS[k].not_run] == ['python benchmarks/compare.py --rounds=1']
  assert 'the one that `tests/test_readme_commands.py` does not run' in ' '.join(text.split())
  assert '<!-- test-command -->' in text


# ---------------------------------------------------------------------------------------------
# The scratch directory.

MY_REWARDS = '''
def correct(prompts, completions, answer, **_):
  return [float(c.strip().startswith(a)) for c, a in zip(completions, answer)]
'''


def _scratch(root, quickstart_dir=None):
  """The directory the README's commands assume, under `root`."""
  for name in ('experiments', 'benchmarks'):
    os.symlink(os.path.join(ROOT, name), os.path.join(root, name))
  for place, golden in CHECKPOINTS.items():
    os.makedirs(os.path.dirname(os.path.join(root, place)) or root, exist_ok=True)
    os.symlink(os.path.join(GOLDEN, golden), os.path.join(root, place))
  os.makedirs(os.path.join(root, 'tmp'))
  if quickstart_dir:
    os.makedirs(os.path.join(root, 'workdirs'))
    shutil.copytree(quickstart_dir, os.path.join(root, 'workdirs', 'quickstart'))
    os.symlink(os.path.join(root, 'workdirs', 'quickstart'), os.path.join(root, 'tmp',
                                                                           'quickstart'))
    # benchmarks/sft_tasks.py --root=tmp/sft_bench reuses the quickstart it finds there.
    os.makedirs(os.path.join(root, 'tmp', 'sft_bench'))
    os.symlink(os.path.join(root, 'workdirs', 'quickstart'),
               os.path.join(root, 'tmp', 'sft_bench', 'quickstart'))
  facts = [('France', 'Paris'), ('Peru', 'Lima'), ('Kenya', 'Nairobi'), ('Japan', 'Tokyo')] * 4

  def jsonl(name, records):
    with open(os.path.join(root, name), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in records)

  jsonl('sft.jsonl', [{'prompt': f'Q: What is the capital of {c}?\nA:', 'completion': f' {a}.'}
                      for c, a in facts])
  jsonl('chat.jsonl', [{'messages': [{'role': 'user', 'content': f'Capital of {c}?'},
                                     {'role': 'assistant', 'content': f'{a}.'}]}
                       for c, a in facts])
  jsonl('pairs.jsonl', [{'prompt': f'Capital of {c}?', 'chosen': f' {a}.', 'rejected': ' Oslo.'}
                        for c, a in facts])
  jsonl('prompts.jsonl', [{'prompt': f'Capital of {c}?', 'answer': a} for c, a in facts])
  jsonl('hellaswag.jsonl', [{'context': f'The capital of {c} is', 'choices': [f' {a}', ' Oslo'],
                             'answer': 0} for c, a in facts[:4]])
  with open(os.path.join(root, 'my_rewards.py'), 'w') as f:
    f.write(MY_REWARDS)
  story = ('Once upon a time, there was a sleepy cat named Kai. Kai lived in Valencia. Every '
           'morning, Kai ate fish. The capital of Kenya is Nairobi.\n')
  with open(os.path.join(root, 'wiki.txt'), 'w') as f:
    f.write(story * 20)
  os.makedirs(os.path.join(root, 'corpus'))
  jsonl(os.path.join('corpus', 'a.jsonl'), [{'text': story}] * 200)
  with open(os.path.join(root, 'input.txt'), 'w') as f:  # Tiny Shakespeare's alphabet, 20 KB
    f.write(('First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, '
             'speak.\n\n') * 250)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _paths(token: str) -> str:
  for old, new in (('gs://BUCKET/', 'BUCKET/'), ('/data/', 'data/'), ('/tmp/', 'tmp/')):
    token = token.replace(old, new)
  return token


@dataclasses.dataclass
class Runner:
  """Runs one group's commands in README order in `root`."""
  root: str
  readme: str
  port: int = 0
  server: subprocess.Popen | None = None

  def run(self, key: str, tokens: list[str] | None):
    began = time.monotonic()
    try:
      self._run(key, tokens)
    finally:  # shown with a failure, and by -s
      print(f'[{time.monotonic() - began:.1f} s] {key}', flush=True)

  def _run(self, key: str, tokens: list[str] | None):
    entry = COMMANDS[key]
    if tokens is None:
      return self._python(key)
    texts = [key]
    if entry.optional:  # once more with the [optional] flags, after the others
      texts.append(f"{key} {' '.join(_optional_flags(self.readme, key))}")
    for text in texts:
      for old, new in entry.replace:
        text = text.replace(old, new)
      parts = text.replace('8000', str(self.port)).split(' && ')
      for j, part in enumerate(parts):
        self._one([_paths(t) if entry.local else t for t in shlex.split(part)],
                  entry.small if j == len(parts) - 1 else ())

  def _one(self, argv: list[str], small):
    while argv and re.fullmatch(r'[A-Z_]+=\S*', argv[0]):  # env settings: conftest sets them
      name, value = argv.pop(0).split('=', 1)
      assert os.environ.get(name) == value, (name, os.environ.get(name))
    prog, *args = argv
    if prog in PYTHONS and args[:2] == ['-m', 'venv'] or prog.endswith('/pip'):
      return  # .ci/run's steps
    if prog == 'curl':
      out = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, timeout=120)
      assert out.returncode == 0, out.stderr
      assert json.loads(out.stdout)['usage']['completion_tokens'] > 0, out.stdout
      return
    assert prog in PYTHONS, prog
    if args[0] == '-m':
      module, args = args[1], args[2:]
      args = [*args, *small]
      if module == 'llmjax.serve':
        return self._serve(args)
      if module == 'llmjax.chat':
        return self._subprocess(['-m', module, *args], stdin='Capital of Peru?\n')
      mod = importlib.import_module(module)
      if not hasattr(mod, 'main'):
        mod = importlib.import_module(module + '.__main__')
      with contextlib.chdir(self.root):
        sys.path.insert(0, self.root)  # my_rewards, as `python -m` puts the cwd on sys.path
        try:
          assert mod.main(args) == 0, (module, args)
        finally:
          sys.path.remove(self.root)
    else:  # a script: benchmarks/*.py
      self._subprocess([args[0], *args[1:], *small])

  def _subprocess(self, args, stdin=None):
    out = subprocess.run([sys.executable, *args], cwd=self.root, capture_output=True, text=True,
                         input=stdin, timeout=600)
    assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-4000:])
    return out.stdout

  def _serve(self, args):
    self.stop()
    args = [a if not a.startswith('--port=') else f'--port={self.port}' for a in args]
    if not any(a.startswith('--port=') for a in args):
      args.append(f'--port={self.port}')
    log = open(os.path.join(self.root, f'serve_{len(os.listdir(self.root))}.log'), 'w')
    self.server = subprocess.Popen([sys.executable, '-m', 'llmjax.serve', *args], cwd=self.root,
                                   stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
      assert self.server.poll() is None, open(log.name).read()[-4000:]
      try:
        if httpx.get(f'http://127.0.0.1:{self.port}/health', timeout=2).status_code == 200:
          break
      except httpx.HTTPError:
        time.sleep(0.5)
    # The command's own check: a completion from it.
    r = httpx.post(f'http://127.0.0.1:{self.port}/v1/completions', timeout=120,
                   json={'prompt': 'Once upon a time', 'max_tokens': 4})
    assert r.status_code == 200, r.text

  def _python(self, snippet):
    snippet = snippet.replace('8000', str(self.port))
    # The snippet's last expression, printed, is the reply.
    *body, last = snippet.splitlines()
    code = '\n'.join(body + [f'r = {last}', 'print(r)', 'assert r.usage.completion_tokens > 0'])
    self._subprocess(['-c', code])

  def stop(self):
    if self.server is not None:
      self.server.send_signal(signal.SIGTERM)
      try:
        self.server.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.server.kill()
      self.server = None


@pytest.fixture(scope='module')
def quickstart_dir(tmp_path_factory):
  """The README's quickstart command, run once (small) for the groups that start from it."""
  root = str(tmp_path_factory.mktemp('readme_quickstart'))
  _scratch(root)
  runner = Runner(root, open(README).read(), port=_free_port())
  runner.run(FIRST, shlex.split(FIRST))
  return os.path.join(root, 'workdirs', 'quickstart')


@pytest.mark.slow
@pytest.mark.parametrize('group', GROUPS)
def test_readme_commands_run(group, tmp_path, request):
  text = open(README).read()
  root = str(tmp_path)
  needs_quickstart = group in (QUICKSTART, 'rl_tiny', 'serve_bench', 'quantize', 'results')
  _scratch(root, request.getfixturevalue('quickstart_dir') if needs_quickstart else None)
  runner = Runner(root, text, port=_free_port())
  done = {FIRST}  # the fixture ran it
  try:
    for key, tokens in readme_commands(text):
      entry = COMMANDS[key]
      if entry.group != group or entry.ci or entry.not_run or key in done:
        continue
      done.add(key)
      runner.run(key, tokens)
  finally:
    runner.stop()
