"""Preference optimisation (train.objective='dpo'): DPO and its family (dpo.loss: sigmoid,
hinge, ipo, robust, sigmoid_norm, simpo, orpo, kto), formulas and metric names as TRL 1.16.

Any supported Hugging Face checkpoint, its architecture from its config.json, against a
reference model (dpo.ref_hf_dir / dpo.ref_params_dir; default the policy's own initial weights,
for a LoRA policy its base with adapters off), on JSONL pairs in TRL's preference format
({"prompt", "chosen", "rejected"}; KTO: data.format=unpaired_preference, {"prompt",
"completion", "label"}):

    python -m llmjax.main --config=experiments/dpo.py --workdir=W --config.init.hf_dir=POLICY_DIR \\
        --config.dpo.ref_hf_dir=REF_DIR --config.data.path=pairs.jsonl \\
        --config.dpo.loss=robust --config.dpo.label_smoothing=0.1 --config.dpo.beta=0.3

The step-1 metrics of that command at train.lr=0 equal TRL's DPOTrainer on the same models
and pairs (tests/test_dpo_run.py). train.batch_size counts pairs (data.pairs_per_row=1).

    python -m llmjax.main --config=experiments/dpo.py:tiny --workdir=/tmp/dpo_tiny

`:tiny` continues the tiny SFT model (`experiments/sft.py:tiny`, in /tmp/sft_tiny; params_dir=
to use another) on the built-in preference pairs (`llmjax.data.tasks.preference_pairs`: the
right answer against a plausible wrong or badly formatted one), scoring held-out
eval_rewards/accuracies and the tasks' exact match at every eval. From the SFT model of
`benchmarks/sft_tasks.py` (`python benchmarks/preference_tasks.py --sft=/tmp/sft_bench/full`,
300 steps, 723 s on 2 shared CPU cores): held-out rewards/accuracies 0.928 (320 pairs; 0.863
at step 100, 0.897 at 200), exact match arithmetic 0.92 -> 1.00, facts 0.99 -> 1.00, strings
0.12 -> 0.14.

Arguments (after ':'): [VARIANT,]lora=RANK, loss=NAME, beta=B, seq_len=N, batch=N (pairs);
`:tiny` also params_dir=DIR, steps=N; `:llama3-8b` also precompute_ref=1.

`:llama3-8b` pins Llama 3 8B (model.preset, so `llmjax.plan` needs no checkpoint and a wrong
--config.init.hf_dir is a one-line error) with sft.py's `:llama3-8b` settings (bf16 compute,
full remat, the Pallas flash kernel, the head and log-probs 1024 positions at a time, ZeRO-3
over all chips), rows of 4096 tokens (each pair's two sequences <= 2048 tokens), 16 pairs a
step, TRL's rate 1e-6 (LoRA 5e-6). Three ways to hold the reference:

  full DPO            policy in fp32 with Adam + a frozen bf16 copy of the initial weights
                      (the step's third argument): v5p-8
  lora=16             rank-16 adapters on a frozen bf16 base; the reference is that base with
                      adapters off (no second copy): v5e-8
  precompute_ref=1    the reference's log-probs of every pair computed in one pass before
                      training (dpo.precompute_ref) and read from the batches: the step is
                      SFT's, with no reference at all (v5p-8; the pass itself, the
                      reference's forward only, is a separate program that plan does not
                      compile)

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \\
        --config=experiments/dpo.py:llama3-8b --topology=v5p:2x2x1
    python -m llmjax.launch create --name=dpo8b --zone=us-east5-a --accelerator=v5p-8
    python -m llmjax.launch setup --name=dpo8b --zone=us-east5-a
    python -m llmjax.launch run --name=dpo8b --zone=us-east5-a \\
        --config=experiments/dpo.py:llama3-8b --workdir=gs://BUCKET/dpo8b \\
        -- --config.init.hf_dir=/data/Meta-Llama-3-8B-Instruct --config.data.path=/data/pairs.jsonl

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \\
        --config=experiments/dpo.py:llama3-8b,lora=16 --topology=v5e:2x4
    python -m llmjax.launch create --name=dpolora8b --zone=us-west4-a --accelerator=v5litepod-8
    python -m llmjax.launch setup --name=dpolora8b --zone=us-west4-a
    python -m llmjax.launch run --name=dpolora8b --zone=us-west4-a \\
        --config=experiments/dpo.py:llama3-8b,lora=16 --workdir=gs://BUCKET/dpolora8b \\
        -- --config.init.hf_dir=/data/Meta-Llama-3-8B-Instruct --config.data.path=/data/pairs.jsonl

`:llama3-8b,precompute_ref=1` launches as the first (v5p-8, --workdir=gs://BUCKET/dpopre8b).
The policy's init.hf_dir is also the reference unless --config.dpo.ref_hf_dir names another
(an SFT checkpoint, say); use the -Instruct (or your SFT) weights, DPO starts from a tuned model.

`llmjax.plan` per chip (full output and compile times: benchmarks/sft_plan.md, "DPO and
reward models"):

  --config=experiments/dpo.py:     --topology=  batch x seq    GiB of HBM: total (arguments
                                                (per chip)     [reference] + temporaries)
  llama3-8b                        v5p:2x2x1    16 x 4096 (4)  52.91 of 95.73 (26.18 [3.74] + 26.69)  fits
  llama3-8b,lora=16                v5e:2x4      16 x 4096 (2)   9.66 of 15.75 (2.20 [0] + 7.39)       fits
  llama3-8b,precompute_ref=1       v5p:2x2x1    16 x 4096 (4)  49.15 of 95.73 (22.44 [0] + 26.68)     fits

The frozen reference of full DPO is 3.74 GiB a chip (8.0B weights over 4 chips in bf16, the
dtype every matmul reads them in, so its log-probs are those of the fp32 weights; no optimizer
state) on top of SFT's 22.44 GiB of train state; its forward pass (no gradients, so never rerun
by remat) adds ~1/3 to the step's FLOPs. LoRA-DPO's reference costs only its forward's
temporaries (7.39 GiB of temporaries against LoRA SFT's 7.02). Full DPO does not fit on a
v5e-8 (the compiler asks for 21.83 GiB of temporaries a chip on top of 11.22 GiB of train
state and 1.87 of reference), as full SFT does not; precompute_ref=1 there leaves full SFT's
step, which does not fit either.
"""

import dataclasses

import ml_collections

from llmjax import config as config_lib


def get_config(arg=None):
  variant, rest = config_lib.split_variant(arg, VARIANTS)
  if variant:
    return VARIANTS[variant](rest)
  a = config_lib.parse_arg(rest, lora=0, loss='sigmoid', beta=0.1, seq_len=1024, batch=16)
  c = config_lib.base_config()  # unpinned: init.hf_dir's config.json gives the architecture
  c.model.dtype = 'bfloat16'  # bf16 matmuls; params and Adam stay float32
  c.model.remat = 'full'  # two sequences a pair: recompute activations instead of storing them
  _lora(c, a.lora)
  _dpo(c, a)
  c.data.format = 'unpaired_preference' if a.loss == 'kto' else 'preference'
  # Each pair's two sequences share a row of seq_len tokens: prompt + completion <= seq_len/2.
  c.data.seq_len = a.seq_len
  c.train.batch_size = a.batch
  _schedule(c, a.lora)
  return c


def _lora(c, rank: int) -> None:
  if rank:
    c.model.lora_rank = rank
    c.model.lora_alpha = 2.0 * rank
    c.model.lora_targets = ['q', 'k', 'v', 'o', 'gate', 'up', 'down']


def _dpo(c, a) -> None:
  c.train.objective = 'dpo'
  c.dpo.loss = a.loss
  c.dpo.beta = a.beta
  # A token-frequency baseline says nothing about preferences.
  c.train.unigram_baseline_batches = 0


def _schedule(c, lora: int) -> None:
  """1,000 steps at TRL's DPO default peak rate (DPOConfig.learning_rate): DPO moves a tuned
  model only a little; LoRA adapters start at zero and take larger steps."""
  c.train.steps = 1_000
  c.train.lr = 5e-6 if lora else 1e-6
  c.train.warmup_steps = 30
  c.train.min_lr_ratio = 0.0
  c.train.weight_decay = 0.0
  c.train.eval_every = 200
  c.train.checkpoint_every = 200


def _tiny(arg: str) -> ml_collections.ConfigDict:
  """The tiny SFT model on the built-in preference pairs, on a laptop CPU."""
  a = config_lib.parse_arg(arg, lora=0, loss='sigmoid', beta=0.1, params_dir='/tmp/sft_tiny',
                           steps=300, sft_weight=1.0)
  c = config_lib.base_config('tiny', vocab_size=1024, max_seq_len=1024)  # the quickstart's
  c.init.params_dir = a.params_dir  # its tokenizer comes with it; it is also the reference
  _lora(c, a.lora)
  _dpo(c, a)
  c.data.format = 'unpaired_preference' if a.loss == 'kto' else 'preference'
  c.data.builtin_tasks = ('arithmetic', 'facts', 'strings')
  c.data.seq_len = 64  # two ~20-token sequences a pair
  c.data.pairs_per_row = 1
  c.data.eval_batches = 10  # 320 of the 328 held-out pairs (interleaved by task)
  c.train.batch_size = 32
  c.train.steps = a.steps
  # RPO (Pang et al. 2024): the chosen answers' NLL keeps the likelihood of right answers from
  # falling with the rejected ones', so exact match holds (at 4e-5 plain DPO lowered the
  # arithmetic EM from 0.92 to 0.80 over 150 steps; with it, 0.98).
  c.dpo.sft_weight = a.sft_weight
  c.train.lr = 1e-4 if a.lora else 4e-5
  c.train.warmup_steps = 20
  c.train.min_lr_ratio = 1.0
  c.train.weight_decay = 0.0
  c.train.log_every = 10
  c.train.eval_every = c.train.checkpoint_every = max(a.steps // 3, 1)
  c.eval.max_new_tokens = 8
  c.sample.prompts = ()
  return c


@dataclasses.dataclass(frozen=True)
class FromHF:
  """Full or LoRA DPO of one pinned preset from its Hugging Face directory (init.hf_dir, given
  on the command line; it is also the reference unless dpo.ref_hf_dir names another). Defaults
  fit the slices of the module docstring's table (`llmjax.plan`)."""
  preset: str  # a key of llmjax.models.config.PRESETS
  seq_len: int  # a row: the pair's two sequences, each prompt + completion <= seq_len / 2
  batch: int  # global, in pairs (data.pairs_per_row=1)

  def __call__(self, arg: str) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(arg, lora=0, loss='sigmoid', beta=0.1, seq_len=self.seq_len,
                             batch=self.batch, precompute_ref=0)
    c = config_lib.base_config(self.preset)  # pinned: a different checkpoint is an error
    c.model.dtype = 'bfloat16'
    if a.lora:
      # The frozen base in bfloat16, as released; it is also the reference (adapters off), so
      # LoRA-DPO holds one copy of the weights.
      c.model.param_dtype = 'bfloat16'
      _lora(c, a.lora)
    else:
      # fp32 master weights and Adam: DPO's updates at 1e-6 are below bf16's resolution. The
      # frozen reference is a third copy of the weights in the same dtype (4 bytes a weight).
      c.model.param_dtype = 'float32'
    _dpo(c, a)
    # 1: the reference's log-probs of every pair are computed once before training (into
    # WORKDIR/reference_logps/) and come in the batches: the step holds no reference at all.
    c.dpo.precompute_ref = bool(a.precompute_ref)
    c.data.format = 'unpaired_preference' if a.loss == 'kto' else 'preference'
    # As sft.py's variants: only block inputs survive to the backward pass; the flash kernel
    # (no [heads, seq, seq] scores); the 128k-vocab head and log-probs 1024 positions at a
    # time (the policy's and the reference's: no [batch, seq, vocab] float32 logits).
    c.model.remat = 'full'
    c.model.attention = 'pallas'
    c.train.loss_chunk = 1024
    c.data.seq_len = a.seq_len
    c.data.pairs_per_row = 1  # TRL's batching: one pair a row, train.batch_size counts pairs
    c.data.vocab_size = c.model.vocab_size  # the checkpoint's tokenizer
    # ZeRO-3 over every chip: weights (the reference's too), gradients and Adam sharded.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.sharding.rules = 'fsdp'
    c.train.batch_size = a.batch
    _schedule(c, a.lora)
    return c


VARIANTS = {
    # The tiny SFT model on the built-in preference pairs (CPU).
    'tiny': _tiny,
    # Llama 3 8B (or -Instruct) on TPU: full DPO on a v5p-8, LoRA-DPO on a v5e-8.
    'llama3-8b': FromHF('llama3-8b', seq_len=4096, batch=16),
}
