"""Llama 3 8B QLoRA SFT on ONE v5e chip (15.75 GiB), from the released weights.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): the frozen 8B base's
projection kernels are stored in 4-bit NormalFloat (model.base_quant='nf4', blocks of 64 with
a float32 absmax each: 0.5625 bytes a weight, `llmjax.quant`), dequantized to bfloat16 inside
each matmul; rank-16 float32 LoRA adapters on every attention and MLP projection train with
AdamW. The token embedding, norms and the LM head stay bfloat16 (QLoRA quantizes the linear
layers only). From `init.hf_dir` the bf16 kernels are quantized once, leaf by leaf, when the
state is built; checkpoints hold the packed bytes; `convert --to=hf` and `generate --workdir`
dequantize and fold the adapters in (`lora.merge`).

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \
        --config=experiments/llama3_8b_qlora.py --topology=v5e:1x1
    python -m llmjax.launch create --name=qlora8b --zone=us-west4-a --accelerator=v5litepod-1
    python -m llmjax.launch setup --name=qlora8b --zone=us-west4-a
    python -m llmjax.launch run --name=qlora8b --zone=us-west4-a \
        --config=experiments/llama3_8b_qlora.py --workdir=gs://BUCKET/llama3_8b_qlora \
        -- --config.init.hf_dir=/data/Meta-Llama-3-8B --config.data.path=/data/sft.jsonl

Arguments (after ':'): seq_len=N, batch=N (sequences a step), rank=N, accum=N, double=0|1.

`llmjax.plan` on v5e:1x1 (one chip; rules 'fsdp' over a 1-device mesh), batch 8 x 2048 in 4
micro-batches of 2, rank 16: 13.05 GiB of 15.75 (83%) -> fits: 6.08 GiB arguments (the NF4
kernels 3.9 GiB, the bf16 embedding and LM head 0.98 GiB each, the adapters with their Adam
moments) + 6.92 GiB temporaries; 5.49e14 model FLOPs a step, step >= 3.8 s at peak.
(Not planned: larger micro-batches, accum=2 or 1; the activations and chunked logits grow
with the micro-batch, so check them with the command above before using them.)
"""

from llmjax import config as config_lib


def get_config(arg=None):
  # 2 sequences a micro-batch, 4 micro-batches a step: 8 x 2048 tokens an optimizer step.
  # Activations and the chunked logits grow with the micro-batch; accumulation costs no memory.
  a = config_lib.parse_arg(arg, seq_len=2048, batch=8, rank=16, accum=4, double=0)
  c = config_lib.base_config('llama3-8b')
  c.model.dtype = 'bfloat16'
  # Embedding, norms and head as released (bf16); the quantized kernels ignore param_dtype.
  c.model.param_dtype = 'bfloat16'
  c.model.base_quant = 'nf4'
  c.model.quant_block_size = 64  # QLoRA's block; bitsandbytes-loadable sizes only
  # Double quantization saves 0.047 bytes a weight (0.33 GB on 7B kernels); off by default
  # since the single-quantized bytes already fit (double=1 turns it on).
  c.model.quant_double = bool(a.double)
  c.model.lora_rank = a.rank
  c.model.lora_alpha = 2.0 * a.rank  # alpha = 2 x rank: the common LoRA SFT recipe
  c.model.lora_targets = ['q', 'k', 'v', 'o', 'gate', 'up', 'down']  # all linear layers (QLoRA)
  c.model.attention = 'pallas'  # flash attention: no [heads, T, T] float32 scores
  c.model.remat = 'full'  # only each block's input survives to the backward pass
  c.data.format = 'prompt_completion'
  c.data.seq_len = a.seq_len
  c.train.loss_chunk = 1024  # the head and loss 1024 positions at a time: no 4 GiB logits
  c.data.vocab_size = c.model.vocab_size
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # one chip: every axis of size 1
  c.sharding.rules = 'fsdp'
  c.train.batch_size = a.batch
  c.train.grad_accum = a.accum  # more sequences a step without more activation memory
  c.train.steps = 1_000
  c.train.lr = 2e-4  # QLoRA's rate for 7B-13B models
  c.train.warmup_steps = 30
  c.train.min_lr_ratio = 0.0
  c.train.weight_decay = 0.0
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.unigram_baseline_batches = 0
  return c
