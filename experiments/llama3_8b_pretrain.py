"""Llama 3 8B pretraining at sequence length 8192 on one TPU slice (v5p-8 or v6e-8).

Check the fit on any machine, then launch on the TPU VM (see README "Scaling out"):

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \
        --config=experiments/llama3_8b_pretrain.py:tpu=v5p-8 --topology=v5p:2x2x1
    python -m llmjax.launch create --name=llama8b --zone=us-east5-a --accelerator=v5p-8
    python -m llmjax.launch setup --name=llama8b --zone=us-east5-a
    python -m llmjax.launch run --name=llama8b --zone=us-east5-a \
        --config=experiments/llama3_8b_pretrain.py:tpu=v5p-8 --workdir=gs://BUCKET/llama3_8b \
        -- --config.data.path='/data/shards/*.jsonl' --config.data.tokenizer_path=/data/llama3.model

Arguments (after ':'): tpu=v5p-8|v6e-8, batch=N (global, rows of 8192 tokens; 0 = the default).

`llmjax.plan` per chip (fp32 weights and Adam state, full remat, fsdp over all chips):
  the defaults below: model.attention='pallas' (no T x T scores), train.loss_chunk=1024
    v5p-8 (v5p:2x2x1, fsdp=4):  batch 32 (8/chip) 84.70 GiB of 95.73 -> fits
    v6e-8 (v6e:2x4, fsdp=8):    batch 16 (2/chip) 30.08 GiB of 31.24 -> fits (96%: batch=8
                                for headroom)
  without the chunked loss (the [8192, 128256] float32 logits and their gradient, ~8 GiB a
  sequence, exist at once):
    v5p-8:  batch 24 (6/chip) 87.17 GiB; batch 32 107.16 GiB, does not fit
    v6e-8:  batch 8 (1/chip) 24.29 GiB
  model.attention='xla' as well (materialises [heads, 8192, 8192] float32 scores):
    v5p-8 (fsdp=4):             batch 8 (2/chip) 78.41 GiB; batch 16: compiler OOM
    v6e-8 (fsdp=2 x tensor=4):  batch 2 27.87 GiB; fsdp=8 batch 8: compiler OOM
MaxText's llama3-8b for comparison: 40.5 GiB at 1 sequence a chip on v5p-8 (fits up to 8),
and on v6e-8 only 1 a chip (26.3 GiB).
"""

from llmjax import config as config_lib
from llmjax.errors import ConfigError

# Per slice: (mesh fsdp, mesh tensor, rules, default global batch), the largest batch plan fits.
LAYOUTS = {
    # ZeRO-3 over the 4 chips: 8B x 12 bytes = 22.4 GiB of state each, the rest for activations.
    'v5p-8': (-1, 1, 'fsdp', 32),
    # ZeRO-3 over all 8 chips: 11.2 GiB of state each. With the flash kernel a whole 8192-token
    # sequence per chip fits; with 'xla' attention use fsdp=2 x tensor=4 (splits the scores).
    'v6e-8': (-1, 1, 'fsdp', 16),
}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, tpu='v5p-8', batch=0)
  if a.tpu not in LAYOUTS:
    raise ConfigError(f"tpu='{a.tpu}' is not one of {list(LAYOUTS)}.")
  fsdp, tensor, rules, batch = LAYOUTS[a.tpu]
  c = config_lib.base_config('llama3-8b')
  # As MaxText's llama3-8b baseline: float32 weights and Adam moments, bf16 matmuls, and full
  # rematerialisation: only each block's input is kept for the backward pass, which is what
  # lets 8192-token rows fit.
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.remat = 'full'
  c.model.attention = 'pallas'  # the Pallas flash kernel: see the plan numbers above
  c.data.seq_len = 8192
  c.train.loss_chunk = 1024  # the head and loss 1024 positions at a time: no 4 GiB logits
  c.data.vocab_size = c.model.vocab_size  # use Llama 3's tokenizer (data.tokenizer_path)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, fsdp, tensor
  c.sharding.rules = rules
  c.train.batch_size = a.batch or batch
  c.train.steps = 10_000
  c.train.lr = 3e-4
  c.train.warmup_steps = 500
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  return c
