"""Qwen2.5-7B full-parameter SFT on a v5p-16 (8 chips, 2 hosts).

SFT is the pretraining step with another batch: data.format='prompt_completion' reads JSONL
records `{"prompt": "...", "completion": "..."}` and sets `loss_mask` to 1 on the completion's
tokens (and EOS) only, so `losses.next_token_loss` trains on the answers; `init.params_dir`
starts from converted Qwen2.5-7B weights (an llmjax workdir, see llmjax/interop).

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \
        --config=experiments/qwen25_7b_sft_v5p16.py --topology=v5p:2x2x2
    python -m llmjax.launch create --name=qwen-sft --zone=us-east5-a --accelerator=v5p-16
    python -m llmjax.launch setup --name=qwen-sft --zone=us-east5-a
    python -m llmjax.launch run --name=qwen-sft --zone=us-east5-a \
        --config=experiments/qwen25_7b_sft_v5p16.py --workdir=gs://BUCKET/qwen25_7b_sft \
        -- --config.init.params_dir=gs://BUCKET/qwen25_7b_base \
           --config.data.path='/data/sft/*.jsonl' --config.data.tokenizer_path=...

data.path is local to every worker (e.g. copied there or a gcsfuse mount), one record per line:
    {"prompt": "Translate to French: cheese", "completion": " fromage"}

Arguments (after ':'): seq_len=N, batch=N (global, sequences).

`llmjax.plan` on v5p:2x2x2 (fsdp=8, 'pallas' attention, loss_chunk 1024), per chip:
  batch 16 x 4096 (the default, 2 per chip)  24.24 GiB of 95.73 (10.64 GiB train state)
  batch 64 x 4096 (`:batch=64`)              42.41 GiB
  batch 16 x 32768 (`:seq_len=32768`, Qwen2.5's whole context) 62.67 GiB -> all fit
  (with 'xla' attention and whole logits, batch 16 x 4096 needed 33.95 GiB).
"""

from llmjax import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, seq_len=4096, batch=16)
  c = config_lib.base_config('qwen2.5-7b')
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'  # fp32 master weights and Adam moments: small SFT updates
  c.model.remat = 'full'  # 4096-token conversations; activations would not fit otherwise
  c.model.attention = 'pallas'  # flash attention: no [heads, T, T] scores at long contexts
  c.train.loss_chunk = 1024  # the 152k-vocab head and loss 1024 positions at a time
  # Loss on the completions only: the prompts are given at inference, not to be learned.
  c.data.format = 'prompt_completion'
  c.data.seq_len = a.seq_len
  c.data.vocab_size = c.model.vocab_size
  # ZeRO-3 over all 8 chips: 7.6B params x 12 bytes (weights + 2 Adam moments) = 10.6 GiB each.
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.sharding.rules = 'fsdp'
  c.train.batch_size = a.batch
  # Fine-tuning: a short schedule at a low peak rate, no weight decay drift from the base.
  c.train.steps = 2_000
  c.train.lr = 1e-5
  c.train.warmup_steps = 50
  c.train.min_lr_ratio = 0.0
  c.train.weight_decay = 0.0
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.unigram_baseline_batches = 0
  return c
