"""Pretraining any preset on a local text/JSONL corpus (or the embedded one).

    python -m llmjax.main --config=experiments/pretrain.py:model=llama3-1b --workdir=DIR \
        --config.data.path='/data/shards/*.jsonl' --config.train.steps=100

Arguments (after ':'): model=PRESET (see llmjax/models/config.py PRESETS), seq_len=N.
For published presets keep model.vocab_size (their tokenizer's) and pass
--config.data.tokenizer_path=... for the matching sentencepiece model, or train one with
data.vocab_size equal to model.vocab_size.
"""

from llmjax import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, model='small', seq_len=1024)
  c = config_lib.base_config(a.model)
  c.model.dtype = 'bfloat16'  # bf16 matmuls, float32 params/optimizer state and softmax/losses
  c.model.remat = 'full'  # recompute activations in the backward pass: long sequences fit
  c.data.seq_len = a.seq_len
  c.data.vocab_size = c.model.vocab_size
  c.train.steps = 10_000
  c.train.batch_size = 64
  c.train.lr = 3e-4
  c.train.warmup_steps = 500
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.sample.prompts = ('Once upon a time',)
  return c
