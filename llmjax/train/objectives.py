"""What a run optimises (`train.objective`): the loss, whether it needs a reference model, and
the config checks that go with it. Every objective runs through the one train step
(`llmjax.train.step`); they differ only here, in the loss function and the batch.

    'lm'      next-token cross-entropy: pretraining and SFT (data.format text, prompt_completion,
              alpaca, messages)
    'dpo'     the DPO family (`llmjax.train.dpo`, dpo.loss): data.format 'preference' (KTO:
              'unpaired_preference'); a frozen reference model unless the loss is reference-free
    'reward'  a Bradley-Terry reward model (`llmjax.train.reward`): model.head='score',
              data.format 'preference'
    'grpo'    online RL (`llmjax.rl`): rollouts from the policy, rewards, GRPO's loss (rl.*);
              a frozen reference only when rl.beta > 0
    'rloo'    the same loop with RLOO's leave-one-out advantages and sequence-level loss
              (`llmjax.rl.rloo`); rl.beta > 0 folds the KL to the reference into the reward
    'ppo'     the same loop with PPO (`llmjax.rl.ppo`): per-token KL-penalised rewards, GAE
              from a value head on the policy trunk (model.value_head), clipped policy and
              value losses
"""

import functools
from typing import Callable

from llmjax.errors import ConfigError, closest
from llmjax.train import losses

OBJECTIVES = ('lm', 'dpo', 'reward', 'grpo', 'rloo', 'ppo')
RL_OBJECTIVES = ('grpo', 'rloo', 'ppo')  # the online-RL loop (llmjax.rl.loop)
PREFERENCE_FORMATS = ('preference', 'unpaired_preference')


def objective(config) -> str:
  return config.train.get('objective', 'lm')


def check(config, model_cfg) -> None:
  """One-line ConfigErrors for an objective that does not fit the data or the model."""
  obj = objective(config)
  fmt = config.data.get('format', 'text')
  if obj not in OBJECTIVES:
    raise ConfigError(f"train.objective='{obj}' is not one of {list(OBJECTIVES)}."
                      f"{closest(obj, OBJECTIVES)}")
  head = getattr(model_cfg, 'head', 'lm')
  mesh = config.get('mesh', {})
  split = [k for k in ('sequence', 'dcn_sequence') if mesh.get(k, 1) != 1]
  if (fmt in PREFERENCE_FORMATS or obj in RL_OBJECTIVES) and split:
    # A preference row's per-pair arrays (pair_mask, margin, ref_logps: [B, P]) have no
    # positions to split, and a pair's two sequences must stay in one row.
    what = f"train.objective='{obj}'" if obj in RL_OBJECTIVES else f"data.format='{fmt}'"
    raise ConfigError(f"{what} does not run with context parallelism yet"
                      f" (mesh.{split[0]}={mesh.get(split[0])}); set mesh.{split[0]}=1 and"
                      " shard the batch instead (mesh.data / mesh.fsdp).")
  if obj == 'lm' and fmt in PREFERENCE_FORMATS:
    raise ConfigError(f"data.format='{fmt}' holds preference pairs, which train.objective='lm'"
                      " cannot learn from; set train.objective='dpo' (experiments/dpo.py) or"
                      " 'reward' (experiments/reward.py).")
  if obj == 'dpo':
    from llmjax.train import dpo
    cfg = dpo.DPOConfig.from_config(config.dpo)
    dpo.check_data_format(cfg.loss, fmt)
    if head != 'lm':
      raise ConfigError(f"train.objective='dpo' trains a language model, but model.head="
                        f"'{head}'; set model.head='lm'.")
    ref = [k for k in ('ref_hf_dir', 'ref_params_dir') if config.dpo.get(k, '')]
    if len(ref) == 2:
      raise ConfigError(f"dpo.ref_hf_dir='{config.dpo.ref_hf_dir}' and dpo.ref_params_dir="
                        f"'{config.dpo.ref_params_dir}' are both set; name one reference.")
    if ref and not cfg.uses_reference:
      raise ConfigError(f"dpo.{ref[0]} is set but dpo.loss='{cfg.loss}' is reference-free;"
                        f" drop dpo.{ref[0]}.")
    precompute = config.dpo.get('precompute_ref', False)
    if not isinstance(precompute, bool):
      raise ConfigError(f"dpo.precompute_ref={precompute!r} must be True or False.")
    if precompute and not cfg.uses_reference:
      raise ConfigError(f"dpo.precompute_ref=True but dpo.loss='{cfg.loss}' is reference-free"
                        " (it loads no reference); drop dpo.precompute_ref.")
    if precompute and cfg.loss == 'kto':
      # A KL counterpart is the previous completion of its batch: a new pairing every epoch,
      # so its reference log-prob cannot be computed ahead (TRL fixes the pairing instead).
      raise ConfigError("dpo.precompute_ref=True does not apply to dpo.loss='kto': its KL"
                        " counterparts change with every batch; drop dpo.precompute_ref.")
  if obj in RL_OBJECTIVES:
    from llmjax.rl import grpo
    cfg = grpo.RLConfig.from_config(config.rl)
    t = config.train
    if head != 'lm':
      raise ConfigError(f"train.objective='{obj}' trains a language model, but model.head="
                        f"'{head}'; set model.head='lm'.")
    if obj == 'ppo' and not getattr(model_cfg, 'value_head', False):
      raise ConfigError("train.objective='ppo' trains a critic on the policy trunk: set"
                        " model.value_head=True (experiments/ppo.py does).")
    if obj == 'rloo' and cfg.num_generations < 2:
      raise ConfigError(f"train.objective='rloo' needs rl.num_generations >= 2: the baseline of"
                        f" a completion is the mean of the others of its prompt (it is"
                        f" {cfg.num_generations}).")
    if fmt != 'prompt_completion':
      raise ConfigError(f"train.objective='{obj}' samples from prompts: set data.format="
                        f"'prompt_completion' (records need only a prompt); this run's is"
                        f" '{fmt}'.")
    if t.batch_size % cfg.num_generations:
      raise ConfigError(f"train.batch_size={t.batch_size} (completions per step) is not a"
                        f" multiple of rl.num_generations={cfg.num_generations}.")
    if t.checkpoint_every % cfg.num_iterations:
      raise ConfigError(f"train.checkpoint_every={t.checkpoint_every} must be a multiple of"
                        f" rl.num_iterations={cfg.num_iterations}: checkpoints fall between"
                        " rollout batches.")
    if cfg.max_completion_length >= config.data.seq_len:
      raise ConfigError(f"rl.max_completion_length={cfg.max_completion_length} leaves no room"
                        f" for a prompt in data.seq_len={config.data.seq_len}; raise"
                        " data.seq_len.")
    if config.data.seq_len + 1 > model_cfg.max_seq_len:
      raise ConfigError(f"data.seq_len={config.data.seq_len} + 1 exceeds model.max_seq_len="
                        f"{model_cfg.max_seq_len} (rollouts hold the whole row); lower"
                        " data.seq_len.")
    from llmjax.rl import rewards
    rewards.load(config.rl.reward_fns, config.rl.get('reward_weights', ()))
  if obj == 'reward':
    if fmt != 'preference':
      raise ConfigError(f"train.objective='reward' trains on {{prompt, chosen, rejected}} pairs:"
                        f" set data.format='preference' (this run's is '{fmt}').")
    if head != 'score':
      raise ConfigError(f"train.objective='reward' needs a scalar head: set model.head='score'"
                        f" (or start from a *ForSequenceClassification checkpoint); it is"
                        f" '{head}'.")


def uses_reference(config) -> bool:
  """True when the loss reads a reference model's log-probs (DPO, KTO; not SimPO/ORPO; GRPO
  with rl.beta > 0)."""
  if objective(config) in RL_OBJECTIVES:
    return config.rl.get('beta', 0.0) > 0
  if objective(config) != 'dpo':
    return False
  from llmjax.train import dpo
  return dpo.DPOConfig.from_config(config.dpo).uses_reference


def precomputes_reference(config) -> bool:
  """True when the reference's log-probs are computed once before training
  (dpo.precompute_ref) and come in the batches as `ref_logps` [B, 2P]: no reference model is
  loaded during training."""
  return (objective(config) == 'dpo' and uses_reference(config)
          and bool(config.dpo.get('precompute_ref', False)))


def make_loss(config, pad_id: int = -1, model_cfg=None) -> Callable:
  """loss_fn(params, batch, apply_fn[, ref_params]) -> LossOutput for the run's objective,
  with train.loss_chunk applied. pad_id: the tokenizer's pad id (a reward is never read at it,
  as transformers' *ForSequenceClassification). model_cfg: the model; an MoE model's 'lm'
  loss adds the router losses (`losses.RouterLoss`)."""
  chunk = config.train.get('loss_chunk', 0)
  obj = objective(config)
  pairs = config.data.get('pairs_per_row', 1)
  if obj == 'dpo':
    from llmjax.train import dpo
    return dpo.make_loss_fn(dpo.DPOConfig.from_config(config.dpo), pairs, chunk)
  if obj in RL_OBJECTIVES:
    from llmjax.rl import grpo, ppo, rloo
    make = {'grpo': grpo.make_loss_fn, 'rloo': rloo.make_loss_fn, 'ppo': ppo.make_loss_fn}[obj]
    return functools.partial(make(grpo.RLConfig.from_config(config.rl)), loss_chunk=chunk)
  if obj == 'reward':
    from llmjax.train import reward
    return functools.partial(reward.reward_loss, num_pairs=pairs,
                             center_coef=config.reward.get('center_coef', 0.0), pad_id=pad_id,
                             loss_chunk=chunk)
  router = losses.RouterLoss.from_model(model_cfg) if model_cfg is not None else None
  return functools.partial(losses.next_token_loss, loss_chunk=chunk, router=router)


def finish_metrics(config, reduced: dict) -> dict:
  """Reported metrics that are no mean of sums (KTO's rewards/margins), from reduced ones."""
  if objective(config) == 'dpo':
    from llmjax.train import dpo
    return dpo.derived_metrics(dpo.DPOConfig.from_config(config.dpo), reduced)
  return reduced
