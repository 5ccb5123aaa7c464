"""A reward model (train.objective='reward'): the transformer with a scalar head
(model.head='score', read at each sequence's last token, its EOS), trained with the
Bradley-Terry loss on preference pairs, metrics as TRL 1.16's RewardTrainer (loss, accuracy,
margin, mean_reward, min_reward, max_reward).

From any supported checkpoint, an LM (the score head is then new) or a
*ForSequenceClassification reward model (num_labels=1), its architecture from config.json:

    python -m llmjax.main --config=experiments/reward.py --workdir=W --config.init.hf_dir=RM_DIR \\
        --config.data.path=pairs.jsonl

JSONL pairs {"prompt", "chosen", "rejected"} (optional "margin"), tokenized as TRL does (prompt +
completion + EOS). The step-1 metrics of that command at train.lr=0 equal TRL's RewardTrainer
on the same model and pairs (tests/test_dpo_run.py). `llmjax.convert --to=hf` writes the run
back as a *ForSequenceClassification checkpoint; `python -m llmjax.eval --task=reward` scores
pairs with it.

    python -m llmjax.main --config=experiments/reward.py:tiny --workdir=/tmp/reward_tiny

`:tiny` starts from the tiny SFT model (`experiments/sft.py:tiny`, in /tmp/sft_tiny;
params_dir= for another) on the built-in preference pairs, eval accuracy on their held-out
split.

Arguments (after ':'): [tiny,]lora=RANK, seq_len=N, batch=N (pairs).
"""

import ml_collections

from llmjax import config as config_lib


def _reward(c) -> None:
  c.train.objective = 'reward'
  c.model.head = 'score'  # one scalar per position in place of the LM head
  c.data.format = 'preference'
  c.train.unigram_baseline_batches = 0  # a token-frequency baseline says nothing here
  c.train.weight_decay = 0.0


def get_config(arg=None):
  variant, rest = config_lib.split_variant(arg, VARIANTS)
  if variant:
    return VARIANTS[variant](rest)
  a = config_lib.parse_arg(rest, lora=0, seq_len=1024, batch=16)
  c = config_lib.base_config()  # unpinned: init.hf_dir's config.json gives the architecture
  _reward(c)
  c.model.dtype = 'bfloat16'
  c.model.remat = 'full'
  if a.lora:
    c.model.lora_rank = a.lora
    c.model.lora_alpha = 2.0 * a.lora
    c.model.lora_targets = ['q', 'k', 'v', 'o', 'gate', 'up', 'down']
  c.data.seq_len = a.seq_len  # a pair's two sequences share a row
  c.train.batch_size = a.batch
  c.train.steps = 1_000
  # TRL's RewardConfig default rate is 1e-5 for full training; adapters take larger steps.
  c.train.lr = 1e-4 if a.lora else 1e-5
  c.train.warmup_steps = 30
  c.train.min_lr_ratio = 0.0
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  return c


def _tiny(arg: str) -> ml_collections.ConfigDict:
  """A reward model from the tiny SFT model on the built-in preference pairs (CPU)."""
  a = config_lib.parse_arg(arg, params_dir='/tmp/sft_tiny', steps=300)
  c = config_lib.base_config('tiny', vocab_size=1024, max_seq_len=1024)  # the quickstart's
  _reward(c)
  c.init.params_dir = a.params_dir  # everything but the score head; its tokenizer too
  c.data.builtin_tasks = ('arithmetic', 'facts', 'strings')
  c.data.seq_len = 64  # two ~20-token sequences a pair
  c.data.eval_batches = 10  # 320 of the 328 held-out pairs (interleaved by task)
  c.train.batch_size = 32
  c.train.steps = a.steps
  c.train.lr = 1e-4
  c.train.warmup_steps = 20
  c.train.min_lr_ratio = 1.0
  c.train.log_every = 10
  c.train.eval_every = c.train.checkpoint_every = max(a.steps // 3, 1)
  c.sample.prompts = ()
  return c


VARIANTS = {
    # A reward model from the tiny SFT model on the built-in preference pairs (CPU).
    'tiny': _tiny,
}
