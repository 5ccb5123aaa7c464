"""Mixtral 8x7B (8 experts, top-2; 46.7B parameters, 12.9B active) training on a v5p-16 with
expert parallelism.

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \
        --config=experiments/moe_mixtral_8x7b_v5p16.py --topology=v5p:2x2x2

Arguments (after ':'): batch=N (global rows of seq_len tokens; 0 = the default),
seq_len=N, expert=N (mesh.expert; the rest of the 8 chips go to fsdp).

Layout: mesh.expert=4 x fsdp=2: two experts a chip along `expert`, each split along embed over
fsdp (ZeRO-3), so every weight is split 8 ways or (attention, embeddings) 2 ways; the batch
splits over all 8 chips. bf16 weights and Adam moments (6 bytes a parameter: 46.7B x 6 / 8 =
32.6 GiB a chip).

`llmjax.plan` per chip (v5p:2x2x2, mesh expert=4 x fsdp=2, rules 'fsdp', remat 'full', Pallas
attention, loss_chunk 1024, seq 4096; measured 2026-12-03, 65 s to compile on 2 CPU cores):
  batch 8 (1/chip, the default): state 35.99 GiB + temp 50.68 GiB = 86.72 of 95.73 GiB -> fits
                                 (91%); 3.40e14 model FLOPs a chip a step, step >= 853 ms at
                                 peak, MFU ceiling 87%
  batch 16 (2/chip):             state 35.99 GiB + temp 71.79 GiB = 107.82 GiB -> does not fit
"""

from llmjax import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, batch=0, seq_len=4096, expert=4)
  c = config_lib.base_config('mixtral-8x7b')
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'bfloat16'
  c.model.remat = 'full'
  c.model.attention = 'pallas'
  c.data.seq_len = a.seq_len
  c.data.vocab_size = c.model.vocab_size  # Mixtral's tokenizer (data.tokenizer_path)
  c.train.loss_chunk = 1024
  c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, -1, a.expert, 1
  c.sharding.rules = 'fsdp'
  c.train.batch_size = a.batch or 8  # the largest that plan fits (see above)
  c.train.steps = 10_000
  c.train.lr = 3e-4
  c.train.warmup_steps = 500
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  return c
