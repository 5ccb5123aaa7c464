"""Online RL with GRPO (train.objective='grpo', llmjax/rl): the policy samples
rl.num_generations completions per prompt with the generation engine on its own mesh, reward
functions score them, and group-relative advantages weight the clipped policy loss (formulas,
metric names and defaults as TRL 1.16's GRPOTrainer; rl.loss_type dapo by default).

From any supported checkpoint, on JSONL prompts ({"prompt", ...}: the other fields go to the
reward functions) and reward functions by import path (`module:function`, TRL's signature
`fn(prompts, completions, **columns) -> list[float]`):

    python -m llmjax.main --config=experiments/grpo.py --workdir=W --config.init.hf_dir=HF_DIR \\
        --config.data.path=prompts.jsonl --config.rl.reward_fns=my_rewards:correct,my_rewards:short

On a laptop CPU, `:tiny` continues the tiny SFT model (`experiments/sft.py:tiny`, in
/tmp/sft_tiny; params_dir= for another) on the built-in arithmetic task's train prompts with
the exact-match reward, scoring held-out exact match at every eval:

    python -m llmjax.main --config=experiments/quickstart.py --workdir=/tmp/quickstart
    python -m llmjax.main --config=experiments/sft.py:tiny --workdir=/tmp/sft_tiny
    python -m llmjax.main --config=experiments/grpo.py:tiny --workdir=/tmp/grpo_tiny

Arguments (after ':'): [VARIANT,]key=value: algo=grpo|rloo, generations=N, batch=N
(completions per step), lr=X, loss=grpo|bnpo|dr_grpo|dapo (GRPO's), beta=B; `:tiny` also params_dir=DIR, steps=N, tasks=a+b;
`:llama3-8b` also completion=N, seq_len=N, grad_accum=N.

`:llama3-8b` pins Llama 3 8B on a v5p-8 (64 completions of up to 1024 tokens after prompts of
up to 1024 a step, 8 per prompt; fp32 master weights and Adam, bf16 matmuls, full remat, the
Pallas flash kernel, ZeRO-3 over all chips, 4 micro-batches):

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \\
        --config=experiments/grpo.py:llama3-8b --topology=v5p:2x2x1
    python -m llmjax.launch run --name=grpo8b --zone=us-east5-a \\
        --config=experiments/grpo.py:llama3-8b --workdir=gs://BUCKET/grpo8b \\
        -- --config.init.hf_dir=/data/Meta-Llama-3-8B-Instruct --config.data.path=/data/prompts.jsonl \\
        --config.rl.reward_fns=my_rewards:correct

`llmjax.plan` per chip (the train step compiled for the slice; the rollouts' KV cache, bf16,
counted beside the train state, when the step's activations are not alive):

  --config=experiments/grpo.py:  --topology=  batch x seq    GiB of HBM: total (arguments +
                                              (per chip)     temporaries); rollouts
  llama3-8b                      v5p:2x2x1    64 x 2048 (16) 55.90 of 95.73 (22.44 + 33.43) fits;
                                                             KV cache 4.00 (26.44 with the state)
  llama3-8b,beta=0.04            v5p:2x2x1    64 x 2048 (16) 60.16 of 95.73 (26.18 [3.74] + 33.94)
                                                             fits; KV cache 4.00 (30.18)

(about 130 s each to compile on 2 CPU cores.) With rl.beta > 0 the frozen bf16 copy of the
initial weights (3.74 GiB a chip, [bracketed]) is the step's third argument, and its forward
pass adds 2N + attention per token (2.108e15 model FLOPs a chip a step against 1.581e15).
"""

import ml_collections

from llmjax import config as config_lib


def get_config(arg=None):
  variant, rest = config_lib.split_variant(arg, VARIANTS)
  if variant:
    return VARIANTS[variant](rest)
  a = config_lib.parse_arg(rest, generations=8, batch=64, lr=1e-6, loss='dapo', beta=0.0,
                           completion=256, seq_len=512, algo='grpo')
  c = config_lib.base_config()  # unpinned: init.hf_dir's config.json gives the architecture
  c.model.dtype = 'bfloat16'  # bf16 matmuls; params and Adam stay float32
  _grpo(c, a)
  c.rl.max_completion_length = a.completion
  c.data.seq_len = a.seq_len  # prompt + completion per row
  return c


def _grpo(c, a) -> None:
  # algo=rloo: the same loop with RLOO's leave-one-out advantages and sequence-level ratio
  # (llmjax/rl/rloo.py, TRL's RLOOTrainer); rl.beta then folds the KL into the reward.
  c.train.objective = a.algo
  c.data.format = 'prompt_completion'  # records need only a prompt
  c.rl.num_generations = a.generations
  c.rl.loss_type = a.loss
  c.rl.beta = a.beta
  c.train.batch_size = a.batch
  c.train.lr = a.lr  # TRL's GRPO default is 1e-6 for full fine-tuning of a pretrained LM
  c.train.warmup_steps = 0
  c.train.min_lr_ratio = 1.0
  c.train.weight_decay = 0.0
  c.train.unigram_baseline_batches = 0
  c.train.steps = 500
  c.train.log_every = 10
  c.train.eval_every = c.train.checkpoint_every = 100


def _tiny(arg: str) -> ml_collections.ConfigDict:
  """The tiny SFT model on the built-in arithmetic prompts, on a laptop CPU."""
  a = config_lib.parse_arg(arg, generations=8, batch=64, lr=1e-4, loss='dapo', beta=0.0,
                           params_dir='/tmp/sft_tiny', steps=200, tasks='arithmetic', algo='grpo')
  c = config_lib.tiny_rl_config(a.params_dir, a.tasks)
  _grpo(c, a)
  c.train.steps = a.steps
  c.train.log_every = 10
  c.train.eval_every = c.train.checkpoint_every = max(a.steps // 4, 1)
  return c


def _llama3_8b(arg: str) -> ml_collections.ConfigDict:
  """Llama 3 8B (-Instruct, or an SFT of it) on a v5p-8: full fine-tuning in fp32 master
  weights and Adam, bf16 matmuls, ZeRO-3 over the four chips; rollouts on the same chips."""
  a = config_lib.parse_arg(arg, generations=8, batch=64, lr=1e-6, loss='dapo', beta=0.0,
                           completion=1024, seq_len=2048, grad_accum=4, algo='grpo')
  c = config_lib.base_config('llama3-8b')  # pinned: a different checkpoint is an error
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'  # updates at 1e-6 are below bf16's resolution
  # As sft.py's 8B variants: only block inputs survive to the backward pass, the flash kernel,
  # the 128k-vocab head and log-probs 1024 positions at a time.
  c.model.remat = 'full'
  c.model.attention = 'pallas'
  c.train.loss_chunk = 1024
  _grpo(c, a)
  c.rl.max_completion_length = a.completion
  c.data.seq_len = a.seq_len  # prompt (<= seq_len - completion) + completion
  c.data.vocab_size = c.model.vocab_size  # the checkpoint's tokenizer
  # 64 completions of 2048 tokens a step: four micro-batches of 16 (4 rows a chip), the same
  # update (every loss type is normalised by global counts).
  c.train.grad_accum = a.grad_accum
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.sharding.rules = 'fsdp'
  return c


# name -> get_config for that variant (the argument after its name).
VARIANTS = {
    # The tiny SFT model on the built-in arithmetic task (CPU).
    'tiny': _tiny,
    # Llama 3 8B on a v5p-8 (init.hf_dir, data.path and rl.reward_fns on the command line).
    'llama3-8b': _llama3_8b,
}
