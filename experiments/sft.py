"""Supervised fine-tuning of any supported Hugging Face checkpoint (Llama 3, Qwen2/2.5,
Mistral, GPT-2) on a local JSONL file, on whatever devices this machine has.

    python -m llmjax.main --config=experiments/sft.py --workdir=DIR \
        --config.init.hf_dir=/data/Qwen2.5-0.5B --config.data.path=sft.jsonl
    python -m llmjax.main --config=experiments/sft.py:lora=16,format=messages --workdir=DIR \
        --config.init.hf_dir=/data/Meta-Llama-3-8B-Instruct --config.data.path=chat.jsonl

No preset is pinned (model.preset=''), so the architecture is the checkpoint's config.json:
this one file fine-tunes every size. The experiment says only how to run the model (dtypes,
remat, attention, LoRA); the checkpoint's tokenizer (and, for format=messages, its chat
template) is the run's. Pinning a preset (`--config.model.preset=qwen2.5-7b`) makes a
different checkpoint a one-line error instead.

Arguments (after ':'): lora=RANK (0: full fine-tuning), format=prompt_completion|messages,
seq_len=N, batch=N (global, sequences).
"""

from llmjax import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, lora=0, format='prompt_completion', seq_len=1024, batch=16)
  c = config_lib.base_config()  # unpinned: init.hf_dir's config.json gives the architecture
  c.model.dtype = 'bfloat16'  # bf16 matmuls; params (master weights) and Adam stay float32
  c.model.remat = 'full'  # long conversations: recompute activations instead of storing them
  c.model.lora_rank = a.lora
  # Loss on the completions / assistant turns only: prompts are given at inference.
  c.data.format = a.format
  c.data.seq_len = a.seq_len
  c.train.batch_size = a.batch
  # Fine-tuning: a short schedule at a low peak rate (LoRA's adapters take a higher one),
  # no weight decay pulling the weights away from the base.
  c.train.steps = 1_000
  c.train.lr = 2e-4 if a.lora else 1e-5
  c.train.warmup_steps = 30
  c.train.min_lr_ratio = 0.0
  c.train.weight_decay = 0.0
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.unigram_baseline_batches = 0  # a frequency baseline says nothing about a fine-tune
  return c
