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
split. From the SFT model of `benchmarks/sft_tasks.py` (`python benchmarks/preference_tasks.py
--sft=/tmp/sft_bench/full --runs=reward`, 900 steps, 223 s on 2 CPU cores): held-out accuracy
0.909 on all 328 held-out pairs (arithmetic 1.000, facts 0.740, strings 0.804); with
--config.train.seed=1, 0.890 (1.000, 0.714, 0.725). The tasks are mixed 2:1:1
(data.builtin_weights): by size, facts are 4% of the pairs and the score never learns them
(0.869 in all, facts 0.558). Not a misread token (`benchmarks/reward_diagnosis.py`): the trunk
keeps every fact and retrieves it by the first layer, but the score at the EOS has to learn
the check from the 379 facts pairs, which it fits (1.00) well before it generalises (0.74).

Arguments (after ':'): [VARIANT,]lora=RANK, seq_len=N, batch=N (pairs); `:tiny` takes
params_dir=DIR, steps=N instead.

`:llama3-8b` pins Llama 3 8B (model.preset, so `llmjax.plan` needs no checkpoint and a wrong
--config.init.hf_dir is a one-line error) with sft.py's `:llama3-8b` settings (bf16 compute,
fp32 master weights and Adam, full remat, the Pallas flash kernel, ZeRO-3 over all chips),
rows of 4096 tokens (each pair's chosen and rejected sequences <= 2048 tokens), 16 pairs a
step, TRL's rate 1e-5 (LoRA 1e-4). From an LM checkpoint the [4096, 1] score head is new (and
the LM head is dropped); from a LlamaForSequenceClassification one it is loaded.

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \\
        --config=experiments/reward.py:llama3-8b --topology=v5p:2x2x1
    python -m llmjax.launch create --name=rm8b --zone=us-east5-a --accelerator=v5p-8
    python -m llmjax.launch setup --name=rm8b --zone=us-east5-a
    python -m llmjax.launch run --name=rm8b --zone=us-east5-a \\
        --config=experiments/reward.py:llama3-8b --workdir=gs://BUCKET/rm8b \\
        -- --config.init.hf_dir=/data/Meta-Llama-3-8B-Instruct --config.data.path=/data/pairs.jsonl

`:llama3-8b,lora=16` (adapters on every projection of a frozen bf16 base, the score head
trained whole) runs the same way on a v5e-8 (--topology=v5e:2x4, --accelerator=v5litepod-8).

`llmjax.plan` per chip (full output and compile times: benchmarks/sft_plan.md, "DPO and
reward models"):

  --config=experiments/reward.py:  --topology=  batch x seq    GiB of HBM: total (arguments
                                                (per chip)     + temporaries)
  llama3-8b                        v5p:2x2x1    16 x 4096 (4)  45.72 of 95.73 (20.97 + 24.72)  fits
  llama3-8b,lora=16                v5e:2x4      16 x 4096 (2)   9.09 of 15.75 (2.07 + 6.97)    fits

Against full SFT of the 8B (49.15 GiB, sft.py), the train state lacks the [4096, 128256] LM
head (1.47 GiB a chip with its Adam moments) and the temporaries its chunked logits.
"""

import dataclasses

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
  _schedule(c, a.lora)
  return c


def _schedule(c, lora: int) -> None:
  """1,000 steps at TRL's RewardConfig default rate for full training; adapters take larger
  steps."""
  c.train.steps = 1_000
  c.train.lr = 1e-4 if lora else 1e-5
  c.train.warmup_steps = 30
  c.train.min_lr_ratio = 0.0
  c.train.eval_every = 200
  c.train.checkpoint_every = 200


def _tiny(arg: str) -> ml_collections.ConfigDict:
  """A reward model from the tiny SFT model on the built-in preference pairs (CPU)."""
  a = config_lib.parse_arg(arg, params_dir='/tmp/sft_tiny', steps=900)
  c = config_lib.base_config('tiny', vocab_size=1024, max_seq_len=1024)  # the quickstart's
  _reward(c)
  c.init.params_dir = a.params_dir  # everything but the score head; its tokenizer too
  c.data.builtin_tasks = ('arithmetic', 'facts', 'strings')
  # Half the pairs arithmetic, a quarter each facts and strings. By size facts would be 379 of
  # 10,768 pairs (4%), seen under once in 300 steps: the score then learns sums and spellings
  # and never the facts (0.56 held out, 0.87 in all). Equal weights starve arithmetic's
  # 10,000 distinct pairs instead (0.89 at 600 steps, arithmetic 0.95).
  c.data.builtin_weights = (2, 1, 1)
  c.data.seq_len = 64  # two ~20-token sequences a pair
  c.data.eval_batches = 10  # 320 of the 328 held-out pairs (interleaved by task)
  c.train.batch_size = 32
  c.train.steps = a.steps
  # The new head and the trunk at one rate: 1e-4 learns arithmetic by step 300 and no more;
  # 3e-4 at a constant rate fits the facts and then drifts on them (0.77 -> 0.68 held out from
  # step 600 to 900); decayed to 0 it keeps them.
  c.train.lr = 3e-4
  c.train.warmup_steps = 20
  c.train.min_lr_ratio = 0.0
  c.train.log_every = 10
  c.train.eval_every = c.train.checkpoint_every = max(a.steps // 3, 1)
  c.sample.prompts = ()
  return c


@dataclasses.dataclass(frozen=True)
class FromHF:
  """A reward model from one pinned preset's Hugging Face directory (init.hf_dir, given on the
  command line: an LM, whose score head is then new, or a *ForSequenceClassification
  checkpoint). Defaults fit the slice of the module docstring's table (`llmjax.plan`)."""
  preset: str  # a key of llmjax.models.config.PRESETS
  seq_len: int  # a row: the pair's two sequences, each prompt + completion <= seq_len / 2
  batch: int  # global, in pairs

  def __call__(self, arg: str) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(arg, lora=0, seq_len=self.seq_len, batch=self.batch)
    c = config_lib.base_config(self.preset)  # pinned: a different checkpoint is an error
    _reward(c)
    c.model.dtype = 'bfloat16'
    if a.lora:
      c.model.param_dtype = 'bfloat16'  # the frozen base as released; adapters stay float32
      c.model.lora_rank = a.lora
      c.model.lora_alpha = 2.0 * a.lora
      # All linear layers; the new score head is trained whole (state.trainable_mask).
      c.model.lora_targets = ['q', 'k', 'v', 'o', 'gate', 'up', 'down']
    else:
      c.model.param_dtype = 'float32'  # fp32 master weights and Adam, as full SFT
    # As sft.py's variants: only block inputs survive to the backward pass, and the flash
    # kernel never materialises the [heads, seq, seq] scores. No train.loss_chunk: the score
    # head is [embed, 1], there are no vocab-sized logits to chunk.
    c.model.remat = 'full'
    c.model.attention = 'pallas'
    c.data.seq_len = a.seq_len
    c.data.pairs_per_row = 1  # TRL's batching: one pair a row, train.batch_size counts pairs
    c.data.vocab_size = c.model.vocab_size  # the checkpoint's tokenizer
    # ZeRO-3 over every chip: weights, gradients and Adam moments sharded over all of them.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.sharding.rules = 'fsdp'
    c.train.batch_size = a.batch
    _schedule(c, a.lora)
    return c


VARIANTS = {
    # A reward model from the tiny SFT model on the built-in preference pairs (CPU).
    'tiny': _tiny,
    # Llama 3 8B (or -Instruct) as a reward model, fully trained on a v5p-8.
    'llama3-8b': FromHF('llama3-8b', seq_len=4096, batch=16),
}
