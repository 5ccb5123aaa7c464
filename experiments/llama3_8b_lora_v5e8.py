"""Llama 3 8B LoRA SFT on a v5e-8 (8 chips of 15.75 GiB), from the released weights.

LoRA (`llmjax.models.lora`): the 8B base stays frozen in bfloat16 (2 bytes a weight, no
gradients, no Adam moments), and only rank-`rank` adapters on every attention and MLP
projection train, in float32 with AdamW. SFT data is JSONL of {"prompt", "completion"}
records (data.format='prompt_completion'): the loss covers the completions only.

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \
        --config=experiments/llama3_8b_lora_v5e8.py --topology=v5e:2x4
    python -m llmjax.launch create --name=lora8b --zone=us-west4-a --accelerator=v5litepod-8
    python -m llmjax.launch setup --name=lora8b --zone=us-west4-a
    python -m llmjax.launch run --name=lora8b --zone=us-west4-a \
        --config=experiments/llama3_8b_lora_v5e8.py --workdir=gs://BUCKET/llama3_8b_lora \
        -- --config.init.hf_dir=/data/Meta-Llama-3-8B --config.data.path=/data/sft.jsonl

Then `python -m llmjax.convert --to=hf --src=gs://BUCKET/llama3_8b_lora --dst=OUT` writes
the merged model (adapters folded into the weights) for transformers or vLLM.

Arguments (after ':'): seq_len=N, batch=N (global, sequences), rank=N.

`llmjax.plan` on v5e:2x4 (fsdp=8, 'pallas' attention, loss_chunk 1024, rank 16: 42M adapter
parameters), per chip: batch 8 x 8192 (1 per chip) 9.66 GiB of 15.75 (2.20 GiB arguments: the
bf16 base and the adapters' Adam state; 7.42 GiB temporaries) -> fits (11.27 GiB without the
chunked loss). Batch 16 needs 15.87 GiB, just over: for more sequences per step raise
train.grad_accum instead.
"""

from llmjax import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, seq_len=8192, batch=8, rank=16)
  c = config_lib.base_config('llama3-8b')
  c.model.dtype = 'bfloat16'
  # The frozen base in bfloat16, as released: 16 GB of weights are 2 GB per chip under fsdp=8.
  # The adapters are float32 regardless (see ModelConfig.lora_rank).
  c.model.param_dtype = 'bfloat16'
  c.model.lora_rank = a.rank
  c.model.lora_alpha = 2.0 * a.rank  # alpha = 2 x rank: the common LoRA SFT recipe
  c.model.lora_targets = ['q', 'k', 'v', 'o', 'gate', 'up', 'down']  # all linear layers (QLoRA)
  # The flash kernel never materialises the [heads, 8192, 8192] float32 scores (8 GiB per
  # sequence with 'xla' attention, half a v5e chip).
  c.model.attention = 'pallas'
  c.model.remat = 'full'  # only each block's input survives to the backward pass
  c.data.format = 'prompt_completion'
  c.data.seq_len = a.seq_len
  c.train.loss_chunk = 1024  # the head and loss 1024 positions at a time: no 4 GiB logits
  c.data.vocab_size = c.model.vocab_size
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.sharding.rules = 'fsdp'
  c.train.batch_size = a.batch
  c.train.steps = 1_000
  c.train.lr = 2e-4  # LoRA's usual rate: adapters start at zero and need larger steps
  c.train.warmup_steps = 30
  c.train.min_lr_ratio = 0.0
  c.train.weight_decay = 0.0
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.unigram_baseline_batches = 0
  return c
