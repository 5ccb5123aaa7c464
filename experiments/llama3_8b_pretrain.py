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

`llmjax.plan` per chip (model.attention='xla', fp32 weights and Adam state, full remat):
  v5p-8 (v5p:2x2x1, fsdp=4):            batch 8 (2/chip) 78.41 GiB of 95.73 -> fits;
                                        batch 4 (1/chip) 56.75 GiB; batch 16: compiler OOM
  v6e-8 (v6e:2x4, fsdp=2 x tensor=4):   batch 2          27.87 GiB of 31.24 -> fits;
                                        fsdp=8 batch 8: compiler OOM (38 GiB temporaries);
                                        fsdp=4 x tensor=2 batch 4: 32.98 GiB, does not fit
MaxText fits batch 8 on v5p-8 and 8 (1/chip) on v6e-8 because its splash attention never
materialises the [heads, 8192, 8192] float32 scores that 'xla' attention does (8 GiB per
sequence); with a flash kernel in model.attention, re-plan with fsdp=-1 and a larger batch.
"""

from llmjax import config as config_lib
from llmjax.errors import ConfigError

# Per slice: (mesh fsdp, mesh tensor, rules, default global batch), the largest batch plan fits.
LAYOUTS = {
    # ZeRO-3 over the 4 chips: 8B x 12 bytes = 22.4 GiB of state each, the rest for activations.
    'v5p-8': (-1, 1, 'fsdp', 8),
    # 31 GiB chips: tensor=4 splits the heads (and so attention's T x T scores) 4 ways; fsdp=2
    # still halves the 89.8 GiB of state over the pairs.
    'v6e-8': (2, 4, 'fsdp_tensor', 2),
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
  c.data.seq_len = 8192
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
