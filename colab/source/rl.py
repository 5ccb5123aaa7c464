# %% [markdown]
# # Online RL with llmjax: GRPO on the built-in arithmetic task
#
# GRPO (`experiments/grpo.py`, `llmjax.rl`): the policy samples a group of completions per
# prompt with the generation engine, the `exact_match` reward scores each against the answer,
# and the group-relative advantages weight the clipped policy loss (TRL's formulas and metric
# names). It starts from a model that already answers in the tasks' layout: the tiny
# quickstart model, SFT-tuned on the built-in tasks, both trained here first (the same runs as
# `experiments/grpo.py`'s docstring):
#
#     python -m llmjax.main --config=experiments/quickstart.py --workdir=/tmp/quickstart
#     python -m llmjax.main --config=experiments/sft.py:tiny --workdir=/tmp/sft_tiny
#     python -m llmjax.main --config=experiments/grpo.py:tiny --workdir=/tmp/grpo_tiny

# %% install

# %%
import jax

RUNTIME = jax.default_backend()  # 'tpu', 'gpu' or 'cpu'
print(f'{RUNTIME}: {jax.device_count()} device(s): {jax.devices()}')
# Steps of each stage: the experiments' defaults (quickstart 400, SFT 900, GRPO 200 with 64
# completions a step, 8 a prompt), which run on a CPU too (most of an hour on 2 cores) and
# in minutes on an accelerator; the test's (CI, 2 CPU cores) only has to run every cell.
STEPS = ({'quickstart': 20, 'sft': 10, 'grpo': 4} if TEST else
         {'quickstart': 400, 'sft': 900, 'grpo': 200})
STEPS

# %%
import json

from llmjax import config as config_lib
from llmjax.rl.loop import train_rl
from llmjax.train.loop import train_and_evaluate


def small(config):
  """The test's setting: short rows, small batches, one eval on a few examples."""
  if TEST:
    config.train.batch_size = 8
    config.train.eval_every = config.train.checkpoint_every = config.train.steps
    config.data.eval_batches = 1
    config.eval.max_examples = 8
    config.sample.prompts = ()
  return config


BASE, SFT, GRPO = (os.path.join(WORKDIRS, name) for name in ('quickstart', 'sft', 'grpo'))
config = small(config_lib.load_config(f"experiments/quickstart.py:steps={STEPS['quickstart']}"))
sft = small(config_lib.load_config(f"experiments/sft.py:tiny,params_dir={BASE},"
                                   f"steps={STEPS['sft']}"))
if TEST:
  config.data.seq_len = sft.data.seq_len = 64
  config.train.unigram_baseline_batches = 2
train_and_evaluate(config, BASE)
train_and_evaluate(sft, SFT)

# %% [markdown]
# ## GRPO
#
# Each step samples `train.batch_size` completions (`rl.num_generations` per prompt) of the
# arithmetic task's train prompts; every eval scores greedy answers to the held-out ones.

# %%
grpo = config_lib.load_config(f"experiments/grpo.py:tiny,params_dir={SFT},steps={STEPS['grpo']}"
                              + (',batch=16,generations=4' if TEST else ''))
grpo = small(grpo)
if TEST:
  grpo.train.batch_size = 16  # 4 prompts x 4 completions
  grpo.train.log_every = 1
result = train_rl(grpo, GRPO)
{k: v for k, v in result.items() if k.startswith(('reward', 'eval_'))}

# %% [markdown]
# ## The reward curve, from metrics.jsonl
#
# `reward` is the rollouts' mean exact-match reward at each logged step; the held-out exact
# match (greedy) is measured at each eval.

# %%
import matplotlib.pyplot as plt

with open(os.path.join(GRPO, 'metrics.jsonl')) as f:
  rows = [json.loads(line) for line in f]
reward = [(r['step'], r['reward']) for r in rows if 'reward' in r]
held_out = [(r['step'], r['eval_arithmetic_exact_match']) for r in rows
            if 'eval_arithmetic_exact_match' in r]
plt.plot(*zip(*reward), label='rollout reward (mean)')
plt.plot(*zip(*held_out), 'o-', label='held-out exact match')
plt.xlabel('step')
plt.ylabel('reward / exact match')
plt.ylim(-0.05, 1.05)
plt.legend()
plt.show()

# %% [markdown]
# ## Samples
#
# Each eval writes what every held-out example produced to
# `WORKDIR/eval/arithmetic/step_N.jsonl`; here are the last eval's first few, then fresh
# greedy answers from the final checkpoint (`generate.main(flags)` is `python -m
# llmjax.generate FLAGS` in this kernel).

# %%
from llmjax import generate

with open(os.path.join(GRPO, 'eval', 'arithmetic', f"step_{result['step']}.jsonl")) as f:
  for line in list(f)[:5]:
    print(json.loads(line))
assert generate.main([f'--workdir={GRPO}', '--prompt=Q: What is 12 + 7?\nA:',
                      '--prompt=Q: What is 31 + 4?\nA:', '--temperature=0',
                      '--max_new_tokens=8', '--stop=\n']) == 0
