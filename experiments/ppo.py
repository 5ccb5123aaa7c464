"""Online RL with PPO (train.objective='ppo', llmjax/rl/ppo.py): the policy samples one
completion per prompt with the generation engine on its own mesh, reward functions score it,
the score (less rl.beta times the per-token KL to the initial model) is the return of the
episode, and a value head on the policy trunk (model.value_head) gives GAE advantages for the
clipped policy loss while learning the returns (formulas and defaults as TRL's PPOTrainer with
AutoModelForCausalLMWithValueHead).

From any supported checkpoint, on JSONL prompts ({"prompt", ...}) and reward functions by
import path (TRL's signature `fn(prompts, completions, **columns) -> list[float]`):

    python -m llmjax.main --config=experiments/ppo.py --workdir=W --config.init.hf_dir=HF_DIR \\
        --config.data.path=prompts.jsonl --config.rl.reward_fns=my_rewards:correct

On a laptop CPU, `:tiny` continues the tiny SFT model (`experiments/sft.py:tiny`, in
/tmp/sft_tiny; params_dir= for another) on the built-in arithmetic task's train prompts with
the exact-match reward, scoring held-out exact match at every eval:

    python -m llmjax.main --config=experiments/quickstart.py --workdir=/tmp/quickstart
    python -m llmjax.main --config=experiments/sft.py:tiny --workdir=/tmp/sft_tiny
    python -m llmjax.main --config=experiments/ppo.py:tiny --workdir=/tmp/ppo_tiny

Arguments (after ':'): [tiny,]key=value: batch=N (completions per rollout), lr=X, beta=B (the KL
coefficient; > 0 keeps a frozen copy of the initial weights), epochs=N (updates per rollout
batch, TRL's ppo_epochs), vf_coef=X, steps=N; `:tiny` also params_dir=DIR, tasks=a+b.
"""

import ml_collections

from llmjax import config as config_lib


def get_config(arg=None):
  variant, rest = config_lib.split_variant(arg, VARIANTS)
  if variant:
    return VARIANTS[variant](rest)
  a = config_lib.parse_arg(rest, batch=64, lr=1e-6, beta=0.05, epochs=4, vf_coef=0.1,
                           steps=500, completion=256, seq_len=512)
  c = config_lib.base_config()  # unpinned: init.hf_dir's config.json gives the architecture
  c.model.dtype = 'bfloat16'  # bf16 matmuls; params and Adam stay float32
  _ppo(c, a)
  c.rl.max_completion_length = a.completion
  c.data.seq_len = a.seq_len  # prompt + completion per row
  return c


def _ppo(c, a) -> None:
  c.train.objective = 'ppo'
  c.model.value_head = True  # the critic: new on the source's trunk, trained with it
  c.data.format = 'prompt_completion'  # records need only a prompt
  # One completion per prompt (PPO's baseline is the critic, not a group); no group scaling.
  c.rl.num_generations = 1
  c.rl.scale_rewards = 'none'
  c.rl.beta = a.beta  # TRL's PPOConfig kl_coef 0.05 (fixed; no adaptive controller)
  c.rl.num_iterations = a.epochs  # TRL's ppo_epochs: updates per rollout batch
  c.rl.vf_coef = a.vf_coef
  c.train.batch_size = a.batch
  c.train.lr = a.lr
  c.train.warmup_steps = 0
  c.train.min_lr_ratio = 1.0
  c.train.weight_decay = 0.0
  c.train.unigram_baseline_batches = 0
  c.train.steps = a.steps
  c.train.log_every = a.epochs  # once per rollout batch
  # Checkpoints fall between rollout batches: a multiple of the updates per batch.
  c.train.eval_every = c.train.checkpoint_every = max(a.steps // 4 // a.epochs, 1) * a.epochs


def _tiny(arg: str) -> ml_collections.ConfigDict:
  """The tiny SFT model on the built-in arithmetic prompts, on a laptop CPU."""
  a = config_lib.parse_arg(arg, batch=64, lr=1e-4, beta=0.05, epochs=2, vf_coef=0.1,
                           params_dir='/tmp/sft_tiny', steps=200, tasks='arithmetic')
  c = config_lib.tiny_rl_config(a.params_dir, a.tasks)
  _ppo(c, a)
  return c


# name -> get_config for that variant (the argument after its name).
VARIANTS = {
    # The tiny SFT model on the built-in arithmetic task (CPU).
    'tiny': _tiny,
}
