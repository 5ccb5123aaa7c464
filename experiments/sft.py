"""Supervised fine-tuning of any supported Hugging Face checkpoint (Llama 3, Qwen2/2.5,
Mistral, GPT-2) on a local JSONL file, on whatever devices this machine has; or, with a
variant, of one pinned model sized for a TPU slice.

    python -m llmjax.main --config=experiments/sft.py --workdir=DIR \
        --config.init.hf_dir=/data/Qwen2.5-0.5B --config.data.path=sft.jsonl
    python -m llmjax.main --config=experiments/sft.py:lora=16,format=messages --workdir=DIR \
        --config.init.hf_dir=/data/Meta-Llama-3-8B-Instruct --config.data.path=chat.jsonl

On a laptop CPU, `:tiny` continues the quickstart model on the built-in tasks (arithmetic,
facts, strings; data.builtin_tasks), scoring held-out exact match at every eval:

    python -m llmjax.main --config=experiments/quickstart.py --workdir=/tmp/quickstart
    python -m llmjax.main --config=experiments/sft.py:tiny --workdir=/tmp/sft_tiny
    python -m llmjax.main --config=experiments/sft.py:tiny,lora=8 --workdir=/tmp/sft_tiny_lora

(params_dir=DIR for a quickstart elsewhere, steps=N; with lora=RANK, dora=1 for DoRA, quant=nf4 for QLoRA.) Measured by benchmarks/sft_tasks.py on
2 CPU cores: held-out exact match 0.00 -> 0.81 over the three tasks in 417 s (arithmetic
0.92, facts 0.99, strings 0.12); LoRA rank 8 (4.3% of the parameters, 1,200 steps) 0.56 in
571 s.

Arguments (after ':'): [VARIANT,]key=value,... An optional first item without '=' names a
variant (`VARIANTS` below); then lora=RANK (0: full fine-tuning), format=prompt_completion|
alpaca|messages, seq_len=N, batch=N (global, sequences).

Without a variant no preset is pinned (model.preset=''), so the architecture is the
checkpoint's config.json: this one file fine-tunes every size. The experiment says only how to
run the model (dtypes, remat, attention, LoRA); the checkpoint's tokenizer (and, for
format=messages, its chat template) is the run's. Pinning a preset
(`--config.model.preset=qwen2.5-7b`) makes a different checkpoint a one-line error instead.
Defaults: full fine-tuning, seq_len 1024, batch 16.

Variants pin a preset (so a wrong --config.init.hf_dir is a one-line error naming the keys
that differ) and set defaults that `llmjax.plan` has checked on a TPU slice: bf16 compute,
remat, the Pallas flash kernel, the LM head and loss 1024 positions at a time, ZeRO-3 (fsdp
over all chips). Full fine-tuning (the default) keeps float32 master weights and Adam moments;
`lora=16` trains rank-16 adapters (alpha 32) on every attention and MLP projection of a frozen
bfloat16 base.

  variant       checkpoint (or -Instruct)  seq_len  batch  lr (LoRA)    slice
  qwen2.5-0.5b  Qwen2.5-0.5B               4096     16     2e-5 (2e-4)  v5e-4
  llama3-1b     Llama-3.2-1B               4096     16     2e-5 (2e-4)  v5e-8
  llama3-8b     Meta-Llama-3-8B            4096     16     1e-5 (2e-4)  v5p-8 (LoRA: v5e-8)

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \
        --config=experiments/sft.py:llama3-8b --topology=v5p:2x2x1
    python -m llmjax.launch create --name=sft8b --zone=us-east5-a --accelerator=v5p-8
    python -m llmjax.launch setup --name=sft8b --zone=us-east5-a
    python -m llmjax.launch run --name=sft8b --zone=us-east5-a \
        --config=experiments/sft.py:llama3-8b --workdir=gs://BUCKET/sft8b \
        -- --config.init.hf_dir=/data/Meta-Llama-3-8B --config.data.path=/data/sft.jsonl

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \
        --config=experiments/sft.py:llama3-8b,lora=16 --topology=v5e:2x4
    python -m llmjax.launch create --name=lora8b --zone=us-west4-a --accelerator=v5litepod-8
    python -m llmjax.launch setup --name=lora8b --zone=us-west4-a
    python -m llmjax.launch run --name=lora8b --zone=us-west4-a \
        --config=experiments/sft.py:llama3-8b,lora=16 --workdir=gs://BUCKET/lora8b \
        -- --config.init.hf_dir=/data/Meta-Llama-3-8B --config.data.path=/data/sft.jsonl

The others alike: `:llama3-1b[,lora=16]` with --topology=v5e:2x4 / --accelerator=v5litepod-8
and --config.init.hf_dir=/data/Llama-3.2-1B; `:qwen2.5-0.5b[,lora=16]` with v5e:2x2 /
v5litepod-4 and /data/Qwen2.5-0.5B. On one host, llmjax.main runs the same config:

    python -m llmjax.main --config=experiments/sft.py:qwen2.5-0.5b,lora=16 --workdir=DIR \
        --config.init.hf_dir=/data/Qwen2.5-0.5B --config.data.path=sft.jsonl

`llmjax.plan` per chip, each default (full output and compile times: benchmarks/sft_plan.md):

  --config=experiments/sft.py:  --topology=  batch x seq     GiB of HBM: total (arguments
                                             (per chip)      + temporaries)
  qwen2.5-0.5b                  v5e:2x2      16 x 4096 (4)    8.11 of 15.75 (1.40 + 6.67)  fits
  qwen2.5-0.5b,lora=16          v5e:2x2      16 x 4096 (4)    5.88 of 15.75 (0.32 + 5.51)  fits
  llama3-1b                     v5e:2x4      16 x 4096 (2)    6.32 of 15.75 (1.73 + 4.54)  fits
  llama3-1b,lora=16             v5e:2x4      16 x 4096 (2)    4.11 of 15.75 (0.39 + 3.67)  fits
  llama3-8b                     v5p:2x2x1    16 x 4096 (4)   49.15 of 95.73 (22.44 + 26.68) fits
  llama3-8b,lora=16             v5e:2x4      16 x 4096 (2)    9.26 of 15.75 (2.20 + 7.02)  fits

Arguments are the train state and batch (fsdp shards of fp32 weights and two Adam moments for
full SFT; the bf16 base and the adapters' Adam state for LoRA), temp the activations, gradients
and collectives' buffers; total adds the program (~50 MiB). Full SFT of the 8B on a v5e-8 does
not fit: 11.22 GiB of train state and 19.96 GiB of temporaries a chip, so it is a v5p job.
"""

import dataclasses
from typing import Callable

import ml_collections

from llmjax import config as config_lib


def get_config(arg=None):
  variant, rest = config_lib.split_variant(arg, VARIANTS)
  if variant:
    return VARIANTS[variant](rest)
  return _generic(rest)


def _generic(arg: str) -> ml_collections.ConfigDict:
  """No variant: any checkpoint, its architecture from init.hf_dir's config.json."""
  a = config_lib.parse_arg(arg, lora=0, format='prompt_completion', seq_len=1024, batch=16)
  c = config_lib.base_config()  # unpinned: init.hf_dir's config.json gives the architecture
  c.model.dtype = 'bfloat16'  # bf16 matmuls; params (master weights) and Adam stay float32
  c.model.remat = 'full'  # long conversations: recompute activations instead of storing them
  c.model.lora_rank = a.lora
  # Loss on the completions / assistant turns only: prompts are given at inference.
  c.data.format = a.format
  c.data.seq_len = a.seq_len
  c.train.batch_size = a.batch
  _schedule(c, lr=2e-4 if a.lora else 1e-5)
  return c


def _schedule(c: ml_collections.ConfigDict, lr: float) -> None:
  # Fine-tuning: a short schedule at a low peak rate (LoRA's adapters take a higher one),
  # no weight decay pulling the weights away from the base.
  c.train.steps = 1_000
  c.train.lr = lr
  c.train.warmup_steps = 30
  c.train.min_lr_ratio = 0.0
  c.train.weight_decay = 0.0
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.unigram_baseline_batches = 0  # a frequency baseline says nothing about a fine-tune


@dataclasses.dataclass(frozen=True)
class FromHF:
  """Full or LoRA SFT of one pinned preset, from its Hugging Face directory (init.hf_dir,
  given on the command line). Defaults fit the slice in the module docstring's table."""
  preset: str  # a key of llmjax.models.config.PRESETS
  seq_len: int
  batch: int  # global, in sequences
  lr: float  # full fine-tuning's peak rate
  lora_lr: float = 2e-4  # LoRA's usual rate: adapters start at zero and need larger steps

  def __call__(self, arg: str) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(arg, lora=0, format='prompt_completion', seq_len=self.seq_len,
                             batch=self.batch)
    c = config_lib.base_config(self.preset)  # pinned: a different checkpoint is an error
    c.model.dtype = 'bfloat16'
    if a.lora:
      # The frozen base in bfloat16, as released: half the bytes, no gradients, no moments.
      # The adapters are float32 regardless (see ModelConfig.lora_rank).
      c.model.param_dtype = 'bfloat16'
      c.model.lora_rank = a.lora
      c.model.lora_alpha = 2.0 * a.lora  # alpha = 2 x rank: the common LoRA SFT recipe
      c.model.lora_targets = ['q', 'k', 'v', 'o', 'gate', 'up', 'down']  # all linear (QLoRA)
    else:
      c.model.param_dtype = 'float32'  # fp32 master weights and Adam: small SFT updates
    # Only each block's input survives to the backward pass: 2-4 rows of 4096 tokens a chip.
    c.model.remat = 'full'
    # The flash kernel never materialises the [heads, seq, seq] float32 scores ('xla'
    # attention: 2 GiB a 4096-token sequence for Llama 3's 32 heads).
    c.model.attention = 'pallas'
    # The 128k/152k-vocab head and loss 1024 positions at a time: no [batch, seq, vocab]
    # float32 logits (2.3 GiB a 4096-token sequence for Qwen's vocabulary).
    c.train.loss_chunk = 1024
    # Loss on the completions / assistant turns only: prompts are given at inference.
    c.data.format = a.format
    c.data.seq_len = a.seq_len
    c.data.vocab_size = c.model.vocab_size  # the checkpoint's tokenizer
    # ZeRO-3 over every chip: weights, gradients and Adam moments sharded over all of them.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.sharding.rules = 'fsdp'
    c.train.batch_size = a.batch
    _schedule(c, lr=self.lora_lr if a.lora else self.lr)
    return c


def _tiny(arg: str) -> ml_collections.ConfigDict:
  """The quickstart model (init.params_dir) tuned on the built-in tasks, on a laptop CPU."""
  a = config_lib.parse_arg(arg, lora=0, dora=0, quant='', params_dir='/tmp/quickstart', steps=0)
  steps = a.steps or (TINY_LORA_STEPS if a.lora else TINY_STEPS)
  # The quickstart's architecture (experiments/quickstart.py), which init.params_dir must hold.
  c = config_lib.base_config('tiny', vocab_size=1024, max_seq_len=1024)
  c.init.params_dir = a.params_dir  # its tokenizer comes with it
  # The Q/A records as they are (`Q: What is 12 + 7?\nA:` -> ` 19`): the corpus's own layout,
  # so the model starts knowing where an answer goes; loss on the answer and EOS only.
  c.data.format = 'prompt_completion'
  c.data.builtin_tasks = ('arithmetic', 'facts', 'strings')
  c.data.seq_len = 128  # ~7 examples a row: each is ~20 tokens
  c.data.eval_batches = 4
  c.train.batch_size = 16
  c.train.steps = steps
  c.train.warmup_steps = 30
  # A constant rate after warmup: the run is short, and held-out sums are still improving at
  # the end, so a decay would spend the last steps at a rate too low to learn them.
  c.train.min_lr_ratio = 1.0
  c.train.weight_decay = 0.0
  c.train.unigram_baseline_batches = 0  # a frequency baseline says nothing about a fine-tune
  c.train.log_every = 20
  c.train.eval_every = c.train.checkpoint_every = max(steps // 5, 1)
  c.eval.max_new_tokens = 8  # the longest answer (a reversed word) is 7 tokens, plus EOS
  if a.lora:
    c.model.lora_rank = a.lora
    c.model.lora_alpha = 2.0 * a.lora
    c.model.lora_targets = ['q', 'k', 'v', 'o', 'gate', 'up', 'down']
    c.model.use_dora = bool(a.dora)  # dora=1: LoRA's schedule, magnitudes trained too
    c.model.base_quant = a.quant  # quant=nf4|int8: QLoRA, the frozen base stored quantized
    # 2e-3 measured best of 2e-3, 5e-3 (a plateau) and 1e-2 (diverges) at rank 8.
    c.train.lr = TINY_LORA_LR
  else:
    c.train.lr = TINY_LR
  c.sample.prompts = ('Q: What is 12 + 7?\nA:', 'Q: What is the capital of Peru?\nA:',
                      'Q: Spell the word fox backwards.\nA:')
  c.sample.max_new_tokens = 8
  return c


# Measured (benchmarks/sft_tasks.py): held-out sums jump from ~0.2 to ~0.8 exact match between
# steps 300 and 600 at 1e-3; at the quickstart's 3e-3 the facts it knew are damaged first and
# the sums are still at 0.07 by step 600.
TINY_STEPS = 900
TINY_LR = 1e-3
TINY_LORA_LR = 2e-3
# LoRA learns the sums later than full fine-tuning (0.11 held out at step 600, 0.49 at 900):
# it gets the rest of the 10-minute budget.
TINY_LORA_STEPS = 1200

# Variant name -> a function of the rest of the argument (after 'VARIANT,') to the config.
VARIANTS: dict[str, Callable[[str], ml_collections.ConfigDict]] = {
    # The quickstart model on the built-in tasks (CPU): `:tiny` full, `:tiny,lora=8` LoRA.
    'tiny': _tiny,
    # 0.5B on a v5e-4: 1.4 GiB of fp32 weights and moments a chip, 4 rows of 4096 tokens.
    'qwen2.5-0.5b': FromHF('qwen2.5-0.5b', seq_len=4096, batch=16, lr=2e-5),
    # 2e-5: Stanford Alpaca's full-SFT rate. The 8B takes qwen25_7b_sft_v5p16.py's 1e-5, the
    # more cautious rate at 16 sequences a step for a model with 8x the weights.
    'llama3-1b': FromHF('llama3-1b', seq_len=4096, batch=16, lr=2e-5),
    'llama3-8b': FromHF('llama3-8b', seq_len=4096, batch=16, lr=1e-5),
}
