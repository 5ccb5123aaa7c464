"""Quickstart: a tiny Llama-style model on the embedded generated corpus, on a laptop CPU.

Trains a sentencepiece tokenizer and a 4-layer model (d=256) in a few minutes on 2 CPU cores;
eval perplexity ends far below the unigram baseline printed at the start, and the samples
printed at each eval continue the corpus' stories, facts and sums.

    python -m llmjax.main --config=experiments/quickstart.py --workdir=/tmp/quickstart

Arguments (after ':'): steps=N, model=PRESET (e.g. model=small).
"""

from llmjax import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, steps=400, model='tiny')
  # The tokenizer's vocabulary is small because the corpus is: 1024 pieces cover its words.
  c = config_lib.base_config(a.model, vocab_size=1024, max_seq_len=1024)
  c.data.vocab_size = 1024
  c.data.seq_len = 128  # the generated documents are short; longer rows only add padding work
  c.train.steps = a.steps
  c.train.batch_size = 16
  c.train.lr = 3e-3  # a tiny model tolerates (and needs, in 400 steps) a high learning rate
  c.train.warmup_steps = 30
  c.train.weight_decay = 0.0
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.data.eval_batches = 4
  c.sample.prompts = ('Once upon a time', 'The capital of', '12 + 7 =')
  c.sample.max_new_tokens = 40
  return c
