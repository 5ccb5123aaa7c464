# %% [markdown]
# # Fine-tuning with llmjax: LoRA SFT, then DPO, then export
#
# From a Hugging Face checkpoint directory (set `HF_DIR` below; e.g. Qwen2.5-0.5B, Llama 3.2
# 1B), or, when there is none, from the tiny quickstart model trained here first:
#
# 1. exact match of the starting model on the held-out built-in tasks (arithmetic, facts,
#    strings: `llmjax.data.tasks`);
# 2. LoRA SFT on their train split (`experiments/sft.py`), exact match after;
# 3. DPO on the built-in preference pairs (the right answer against a plausible wrong one,
#    `experiments/dpo.py`), exact match after;
# 4. a chat with the result;
# 5. export to Hugging Face (`llmjax.convert --to=hf`) and as a PEFT adapter (`--to=peft`).
#
# Each stage is one `python -m llmjax.main --config=experiments/...` run, here called in the
# kernel; its workdir is the next stage's `init.params_dir`.

# %% install

# %% [markdown]
# ## The runtime and the starting model

# %%
import jax

RUNTIME = jax.default_backend()  # 'tpu', 'gpu' or 'cpu'
print(f'{RUNTIME}: {jax.device_count()} device(s): {jax.devices()}')
# A Hugging Face checkpoint dir (config.json + safetensors + tokenizer), e.g. from
# `huggingface-cli download Qwen/Qwen2.5-0.5B --local-dir /content/Qwen2.5-0.5B`; '' or a
# missing dir: the tiny quickstart model, trained below.
HF_DIR = ''  # @param {type:"string"}
HF_DIR = os.environ.get('LLMJAX_NOTEBOOK_HF_DIR') or HF_DIR  # tests/test_notebooks.py sets it
FROM_HF = bool(HF_DIR) and os.path.isdir(HF_DIR)
# Steps of each stage. The tiny model's accelerator sizes are the experiments' defaults
# (measured on CPU there: SFT 571 s, DPO 723 s); a CPU runtime takes half of them; the test's
# (CI, 2 CPU cores) only has to run every cell.
STEPS = ({'quickstart': 20, 'sft': 10, 'dpo': 6} if TEST else
         {'quickstart': 400, 'sft': 300, 'dpo': 100} if FROM_HF else
         {'quickstart': 400, 'sft': 1200, 'dpo': 300} if RUNTIME != 'cpu' else
         {'quickstart': 400, 'sft': 600, 'dpo': 150})
STEPS

# %%
import json

from llmjax import config as config_lib
from llmjax.train.loop import train_and_evaluate


def small(config):
  """The test's setting: short rows, small batches, one eval on a few examples."""
  if TEST:
    config.data.seq_len = 64
    config.train.batch_size = 8
    config.train.eval_every = config.train.checkpoint_every = config.train.steps
    config.data.eval_batches = 1
    config.eval.max_examples = 8
    config.sample.prompts = ()
  return config


if not FROM_HF:  # the tiny model: experiments/quickstart.py, as in quickstart.ipynb
  BASE = os.path.join(WORKDIRS, 'quickstart')
  config = small(config_lib.load_config(f"experiments/quickstart.py:steps={STEPS['quickstart']}"))
  if TEST:
    config.train.unigram_baseline_batches = 2
  train_and_evaluate(config, BASE)

# %% [markdown]
# ## LoRA SFT on the built-in tasks
#
# Rank-8 adapters on every projection of the frozen base, the loss on the answers only
# (`data.format='prompt_completion'`: `Q: What is 12 + 7?\nA:` -> ` 19`). At every eval the run
# generates greedy answers to the held-out questions and logs `eval_<task>_exact_match`.
# Before training, the same harness (`llmjax.eval.suite`) scores the starting model.

# %%
from llmjax import generate
from llmjax.eval import suite

TASKS = ('arithmetic', 'facts', 'strings')
SFT = os.path.join(WORKDIRS, 'sft')
if FROM_HF:
  sft = config_lib.load_config('experiments/sft.py:lora=8,seq_len=512')
  sft.init.hf_dir = HF_DIR
  sft.data.builtin_tasks = TASKS
  sft.eval.max_new_tokens = 8  # the longest answer (a reversed word) and EOS
  sft.train.steps = STEPS['sft']
  sft.train.eval_every = sft.train.checkpoint_every = max(STEPS['sft'] // 3, 1)
else:
  sft = config_lib.load_config(f"experiments/sft.py:tiny,lora=8,params_dir={BASE},"
                               f"steps={STEPS['sft']}")
sft = small(sft)


def exact_match(config, **source):
  """Held-out exact match of a checkpoint (workdir= or hf=) on config's eval tasks: what the
  run would log at step 0."""
  cfg, params, tokenizer = generate.load({'workdir': '', 'hf': '', **source})
  tasks = suite.load_tasks(config, tokenizer, cfg)
  return suite.run_tasks(tasks, config, cfg, params, tokenizer, step=0, write=False)


def last_eval(workdir):
  """The eval_*_exact_match of the run's last eval, from its metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {k: v for r in rows for k, v in r.items() if k.endswith('_exact_match')}


EXACT_MATCH = {'start': exact_match(sft, **({'hf': HF_DIR} if FROM_HF else {'workdir': BASE}))}
train_and_evaluate(sft, SFT)
EXACT_MATCH['after SFT'] = last_eval(SFT)
EXACT_MATCH

# %% [markdown]
# ## DPO on the built-in preference pairs
#
# New rank-8 adapters on the SFT model (its adapters merged), which is also the reference
# (the adapters off). `eval_rewards/accuracies` is how often the policy prefers the right
# answer of a held-out pair more than the reference does.

# %%
DPO = os.path.join(WORKDIRS, 'dpo')
if FROM_HF:
  dpo = config_lib.load_config('experiments/dpo.py:lora=8,seq_len=512')
  dpo.data.builtin_tasks = TASKS
  dpo.eval.max_new_tokens = 8
  dpo.train.steps = STEPS['dpo']
  dpo.train.eval_every = dpo.train.checkpoint_every = max(STEPS['dpo'] // 3, 1)
else:
  dpo = config_lib.load_config(f"experiments/dpo.py:tiny,lora=8,steps={STEPS['dpo']}")
dpo.init.params_dir = SFT
dpo = small(dpo)
result = train_and_evaluate(dpo, DPO)
EXACT_MATCH['after DPO'] = last_eval(DPO)
print(f"held-out rewards/accuracies {result['eval_rewards/accuracies']:.3f}")
for stage, scores in EXACT_MATCH.items():
  print(f'{stage:10s}', '  '.join(f"{t} {scores[f'eval_{t}_exact_match']:.2f}" for t in TASKS))

# %% [markdown]
# ## Chat with the result
#
# `llmjax.chat.Chat` is the conversation behind `python -m llmjax.chat`: each message is
# rendered with a chat template and the reply streamed. Both stages trained the built-in
# tasks' `Q: ...\nA:` layout (`data.format='prompt_completion'`), whatever template a Hugging
# Face checkpoint brings, so that layout is the template here.

# %%
from llmjax import chat as chat_lib
from llmjax.data import chat as templates

cfg, params, tokenizer = generate.load({'workdir': DPO, 'hf': ''})
QA = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
      "{% else %}A: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}A:{% endif %}")
template = templates.ChatTemplate(QA, tokenizer, 'the built-in tasks\' Q/A layout')
conversation = chat_lib.Chat(cfg, params, tokenizer, template,
                             {'system': '', 'stop': ['\n'], 'seed': 0, 'temperature': 0.0,
                              'max_new_tokens': 16})
for question in ('What is 12 + 7?', 'What is the capital of Peru?',
                 'Spell the word fox backwards.'):
  print(f'> {question}')
  conversation.send(question)
  conversation.reset()  # one question at a time: the tasks were tuned on single turns

# %% [markdown]
# ## Export
#
# `convert.main(flags)` is `python -m llmjax.convert FLAGS` in this kernel. `--to=hf` writes
# the DPO model, its adapters merged, as a transformers checkpoint; `--to=peft` writes the DPO
# adapters alone as a PEFT adapter dir, whose base is the SFT model (exported too).
# `generate --hf=BASE --peft=ADAPTER` loads the adapter over that base: the same greedy
# answers as the merged export.

# %%
from llmjax import convert

EXPORT = os.path.join(WORKDIRS, 'export')
for flags in (['--to=hf', f'--src={DPO}', f'--dst={EXPORT}/dpo_hf'],
              ['--to=hf', f'--src={SFT}', f'--dst={EXPORT}/sft_hf'],
              ['--to=peft', f'--src={DPO}', f'--dst={EXPORT}/dpo_peft',
               f'--base_model={EXPORT}/sft_hf']):
  assert convert.main(flags) == 0
print(sorted(os.listdir(f'{EXPORT}/dpo_peft')))
prompt = ['--prompt=Q: What is 12 + 7?\nA:', '--temperature=0', '--max_new_tokens=8']
assert generate.main([f'--hf={EXPORT}/dpo_hf', *prompt]) == 0
assert generate.main([f'--hf={EXPORT}/sft_hf', f'--peft={EXPORT}/dpo_peft', *prompt]) == 0
