# %% [markdown]
# # llmjax quickstart: train a tiny language model, plot its loss, sample from it
#
# The notebook runs on any Colab runtime (Runtime > Change runtime type: a TPU is fastest) and
# on a laptop. It trains `experiments/quickstart.py` (a 4-layer, 3.5M-parameter Llama-style
# model and its own sentencepiece tokenizer) on the generated corpus that ships inside llmjax,
# the same run as
#
#     python -m llmjax.main --config=experiments/quickstart.py --workdir=/tmp/quickstart
#
# Next: `finetune.ipynb` (LoRA SFT, DPO, export), `rl.ipynb` (GRPO), `scaling.ipynb` (meshes,
# sharding rules and `llmjax.plan`).

# %% install

# %% [markdown]
# ## The runtime
#
# `jax.default_backend()` says what Colab gave us; the sizes below follow from it.

# %%
import jax

RUNTIME = jax.default_backend()  # 'tpu', 'gpu' or 'cpu'
print(f'{RUNTIME}: {jax.device_count()} device(s)')
for d in jax.devices():
  print(' ', d)
# The CPU size is experiments/quickstart.py's own (a few minutes on 2 cores); an accelerator
# takes 4x the batch in less time. The test's size (CI, 2 CPU cores) only has to show the loss
# falling.
SIZES = {'tpu': dict(steps=400, batch=64), 'gpu': dict(steps=400, batch=64),
         'cpu': dict(steps=400, batch=16)}
SIZE = dict(steps=20, batch=8) if TEST else SIZES[RUNTIME]
SIZE

# %% [markdown]
# ## Train
#
# `config_lib.load_config` reads an experiment as `--config=` does; its keys can be changed
# before `train_and_evaluate` (as `--config.train.batch_size=64` would). The run writes its
# tokenizer, checkpoints, `metrics.jsonl` and TensorBoard events to the workdir, and prints
# samples at each eval.

# %%
from llmjax import config as config_lib
from llmjax.train.loop import train_and_evaluate

config = config_lib.load_config(f"experiments/quickstart.py:steps={SIZE['steps']}")
config.train.batch_size = SIZE['batch']
if TEST:  # short rows, one eval at the end on one batch, a short baseline, samples below only
  config.data.seq_len = 64
  config.train.eval_every = config.train.checkpoint_every = SIZE['steps']
  config.data.eval_batches = 1
  config.train.unigram_baseline_batches = 2
  config.sample.prompts = ()
WORKDIR = os.path.join(WORKDIRS, 'quickstart')
result = train_and_evaluate(config, WORKDIR)
result

# %% [markdown]
# ## The loss curve, from metrics.jsonl
#
# One JSON object a line: the train metrics every `train.log_every` steps, the eval metrics at
# each eval, and at step 0 the unigram baseline (the perplexity of predicting every token by
# its frequency alone), which the model has to beat.

# %%
import json
import math

import matplotlib.pyplot as plt

with open(os.path.join(WORKDIR, 'metrics.jsonl')) as f:
  rows = [json.loads(line) for line in f]
train = [(r['step'], r['loss']) for r in rows if 'loss' in r]
evals = [(r['step'], r['eval_loss']) for r in rows if 'eval_loss' in r]
baseline = next(r['unigram_perplexity'] for r in rows if 'unigram_perplexity' in r)
plt.plot(*zip(*train), label='train loss')
plt.plot(*zip(*evals), 'o-', label='eval loss')
plt.axhline(math.log(baseline), color='gray', linestyle='--', label='unigram baseline')
plt.xlabel('step')
plt.ylabel('cross-entropy (nats/token)')
plt.legend()
plt.show()
assert evals[-1][1] < math.log(baseline), 'the model did not beat the unigram baseline'
print(f'eval perplexity {math.exp(evals[-1][1]):.2f} against the unigram baseline {baseline:.2f}')

# %% [markdown]
# ## Sample
#
# `generate.main(flags)` is `python -m llmjax.generate FLAGS` run in this kernel (no second JAX
# start-up); it returns the exit status. `--temperature=0` is greedy decoding.

# %%
from llmjax import generate

assert generate.main([f'--workdir={WORKDIR}', '--prompt=Once upon a time',
                      '--prompt=The capital of', '--prompt=12 + 7 =',
                      '--temperature=0', '--max_new_tokens=32']) == 0
