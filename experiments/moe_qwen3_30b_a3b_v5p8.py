"""Qwen3-30B-A3B (128 experts, top-8; 30.5B parameters, 3.3B active) training on a v5p-8 with
expert parallelism.

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \
        --config=experiments/moe_qwen3_30b_a3b_v5p8.py --topology=v5p:2x2x1

Arguments (after ':'): batch=N (global rows of seq_len tokens; 0 = the default),
seq_len=N, expert=N (mesh.expert; the rest of the 4 chips go to fsdp).

Layout: mesh.expert=4 puts 32 of the 128 experts (and their Adam moments) on each chip; the
batch splits over expert too, so every chip runs attention on its own rows. bf16 weights and
bf16 Adam moments (6 bytes a parameter: 30.5B x 6 / 4 chips = 42.6 GiB a chip): fp32 weights
and moments would need 85 GiB a chip for the state alone, over the budget with activations.

`llmjax.plan` per chip (v5p:2x2x1, mesh expert=4, rules 'fsdp', remat 'full', Pallas attention,
loss_chunk 1024, seq 4096; measured 2026-12-03, 75 s to compile on 2 CPU cores):
  batch 4 (1/chip, the default): state 49.11 GiB + temp 43.12 GiB = 92.28 of 95.73 GiB -> fits
                                 (96%); 1.14e14 model FLOPs a chip a step, step >= 321 ms at
                                 peak, MFU ceiling 78%
  batch 8 (2/chip):              state 49.11 GiB + temp 49.37 GiB = 98.55 GiB -> does not fit
The state is more than 30.5B x 6 / 4 = 42.6 GiB because attention and the embeddings (1.5B)
are replicated over `expert` (mesh.fsdp is 1 here); the temporaries are mostly the gradients
and the gathered token copies of the dispatch (README, "Mixture of experts").
"""

from llmjax import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, batch=0, seq_len=4096, expert=4)
  c = config_lib.base_config('qwen3-30b-a3b')
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'bfloat16'
  c.model.remat = 'full'  # only each block's input kept for the backward pass
  c.model.attention = 'pallas'
  c.data.seq_len = a.seq_len
  c.data.vocab_size = c.model.vocab_size  # Qwen3's tokenizer (data.tokenizer_path)
  c.train.loss_chunk = 1024  # no whole [seq, 151936] float32 logits
  c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, -1, a.expert, 1
  c.sharding.rules = 'fsdp'
  c.train.batch_size = a.batch or 4  # the largest that plan fits (see above)
  c.train.steps = 10_000
  c.train.lr = 3e-4
  c.train.warmup_steps = 500
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  return c
