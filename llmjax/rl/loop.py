"""The online-RL job (train.objective 'grpo', 'rloo' or 'ppo'): sample, score, update, on one
mesh.

    python -m llmjax.main --config=experiments/grpo.py:tiny --workdir=/tmp/grpo_tiny

Each rollout batch: train.batch_size // rl.num_generations prompts (the next ones of a
per-epoch shuffle of the prompt records), rl.num_generations completions each from the
generation engine on the policy's own params (`llmjax.rl.rollout`), rewards from rl.reward_fns
(`llmjax.rl.rewards`), advantages (GRPO's group-relative ones, `llmjax.rl.grpo`, RLOO's
leave-one-out ones, `llmjax.rl.rloo`, or PPO's GAE from the value head, `llmjax.rl.ppo`), then rl.num_iterations optimizer steps of the one train
step (`llmjax.train.step`, the objective's loss from `objectives.make_loss`) on that batch. train.steps
counts optimizer steps, as in every other run.

Exact resume: the prompts of rollout batch k and its sampling seed are functions of k alone, so
a checkpoint needs only the train state; checkpoints (and a SIGTERM stop) fall on rollout
boundaries (train.checkpoint_every must be a multiple of rl.num_iterations). A resumed run
samples and updates exactly as the uninterrupted one (tests/test_rl.py).

Prompts: data.builtin_tasks (their train split; the `answer` column feeds `exact_match`) or a
JSONL file (data.path) of records with data.prompt_key, every other field passed to the reward
functions. Each prompt is tokenized as `llmjax.generate --prompt` does (BOS first); one whose ids
and rl.max_completion_length do not fit data.seq_len + 1 (the train row) is skipped and counted.
"""

import time

import flax.linen as nn
import jax
import numpy as np

from llmjax import files, sharding
from llmjax.errors import ConfigError, DataError
from llmjax.infer import engine
from llmjax.rl import grpo, ppo, rloo, rewards as rewards_lib, rollout as rollout_lib
from llmjax.train import checkpoint, metrics as metrics_lib, objectives
from llmjax.train import state as state_lib
from llmjax.train.loop import _global_batch, _Preemption, make_trainer, setup_workdir

SAMPLES_SHOWN = 2  # rollout samples printed at each eval


def load_tokenizer(config, workdir: str):
  """The policy's tokenizer (data.tokenizer_path, else the source checkpoint's: GRPO starts
  from a trained model, init.params_dir or init.hf_dir), copied into the workdir as every run
  keeps its own (so generate, eval and convert read the RL run as any other)."""
  from llmjax.data import pipeline
  from llmjax.train.loop import data_config
  data_cfg = data_config(config)
  if not data_cfg.get('tokenizer_path', ''):
    raise ConfigError("online RL starts from a trained model: set init.params_dir"
                      " (an llmjax workdir, e.g. an SFT run) or init.hf_dir.")
  return pipeline.build_tokenizer(data_cfg, workdir, None)


def load_prompt_records(config) -> list[dict]:
  """The prompt records {prompt, ...columns}: data.builtin_tasks' train splits or data.path."""
  data = config.data
  if data.get('builtin_tasks'):
    from llmjax.data import tasks
    out = []
    for name in data.builtin_tasks:
      out += [{'prompt': r['prompt'], 'answer': r['answer'], 'task': name}
              for r in tasks.make_task(name, 'train', data.get('builtin_seed', 0))]
    return out
  path = data.get('path', '')
  if not path:
    raise ConfigError("online RL needs prompts: data.builtin_tasks (e.g."
                      " arithmetic) or data.path (JSONL records with a prompt field).")
  from llmjax.eval.records import read_jsonl  # one JSONL reader: each bad line named
  key = data.get('prompt_key', 'prompt')
  out = []
  for line_no, rec in read_jsonl(path):
    if not isinstance(rec.get(key), str):
      raise DataError(f"{path}:{line_no}: a record needs a string '{key}' field"
                      " (data.prompt_key).")
    rec['prompt'] = rec.pop(key)
    out.append(rec)
  return out


def tokenize_prompts(records, tokenizer, room: int, say) -> tuple[list[dict], list[list[int]]]:
  """Prompt ids (BOS + encode) of the records that leave room for the completion; the others
  are skipped, and counted."""
  bos = [tokenizer.bos_id] if getattr(tokenizer, 'bos_id', -1) >= 0 else []
  kept, ids = [], []
  for r in records:
    p = bos + list(tokenizer.encode(r['prompt']))
    if len(p) <= room:
      kept.append(r)
      ids.append(p)
  if len(kept) < len(records):
    say(f"skipped {len(records) - len(kept)} of {len(records)} prompts longer than {room}"
        " tokens (data.seq_len + 1 - rl.max_completion_length)")
  if not kept:
    raise DataError(f"no prompt fits: each needs at most {room} tokens; raise data.seq_len or"
                    " lower rl.max_completion_length.")
  return kept, ids


def prompt_indices(k: int, per_batch: int, n: int, seed: int) -> list[int]:
  """Indices of rollout batch k's prompts: the next per_batch of a fresh shuffle per epoch."""
  perms, out = {}, []  # one shuffle per epoch the batch touches (at most two)
  for g in range(k * per_batch, (k + 1) * per_batch):
    epoch, pos = divmod(g, n)
    if epoch not in perms:
      perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
    out.append(int(perms[epoch][pos]))
  return out


def columns(records: list[dict], num_generations: int) -> dict:
  """Every field but the prompt, as lists repeated for each prompt's completions."""
  keys = sorted({k for r in records for k in r if k != 'prompt'})
  return {k: [r.get(k) for r in records for _ in range(num_generations)] for k in keys}


def make_rollout_batch(k: int, *, config, cfg: grpo.RLConfig, model_cfg, params, records,
                       ids, tokenizer, fns, weights, logps_fn=None, batch_sharding=None,
                       ref_params=None):
  """(host batch dict, rollout metrics, rollout) of rollout batch k.

  logps_fn: (params, batch) -> [B, T] log-probs at rl.temperature: the rollout-time policy's
    (old_logps) when the loss needs them; with ref_params (RLOO or PPO with rl.beta > 0) the
    reference's too, whose log-ratio to the policy is subtracted from the reward. PPO's gives
    {'logps', 'values'}: the critic's values at rollout time too."""
  t = config.train
  algo = objectives.objective(config)
  per = t.batch_size // cfg.num_generations
  idx = prompt_indices(k, per, len(records), t.seed)
  recs = [records[i] for i in idx]
  sp = engine.SamplingParams(max_new_tokens=cfg.max_completion_length,
                             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
  from llmjax.eval.harness import eos_ids
  roll = rollout_lib.sample(model_cfg, params, [ids[i] for i in idx],
                            num_generations=cfg.num_generations, sampling=sp,
                            eos_ids=eos_ids(tokenizer), decode=tokenizer.decode,
                            seed=int(jax.random.randint(jax.random.fold_in(
                                jax.random.key(t.seed), k), (), 0, 2**31 - 1)))
  prompts = [r['prompt'] for r in recs for _ in range(cfg.num_generations)]
  per_func = rewards_lib.score(fns, prompts, roll.texts, columns(recs, cfg.num_generations))
  batch = rollout_lib.to_batch(roll, np.zeros(len(prompts)), config.data.seq_len)
  forward = lambda p: jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(
      logps_fn(p, _global_batch(batch, batch_sharding))))
  # PPO's logps_fn gives the critic's values too (`ppo.make_rollout_fn`), from one trunk pass.
  logps = lambda p: forward(p)['logps'] if algo == 'ppo' else forward(p)
  metrics = {}
  if algo == 'ppo':
    old = forward(params)
    batch['old_logps'] = old['logps']
    ref = logps(ref_params) if ref_params is not None else None
    columns_, m = ppo.rollout_targets(per_func @ weights, old['logps'], old['values'],
                                      batch['completion_mask'], cfg, ref_logps=ref)
    batch.update(columns_)
    metrics.update(m)
    _, m = grpo.advantages(per_func, weights, cfg.num_generations, 'none')  # reward metrics
    m.pop('frac_reward_zero_std')  # about groups, which PPO does not sample
  else:
    # Without logps_fn the loss reads logp itself (detached); zeros keep the batch's structure.
    batch['old_logps'] = logps(params) if logps_fn is not None else np.zeros_like(
        batch['sampler_logps'])
  if algo == 'rloo':
    kl = None
    if ref_params is not None:
      mask = batch['completion_mask']
      per_token = (batch['old_logps'] - logps(ref_params)) * mask
      kl = per_token.sum(-1)
      metrics['kl'] = float(per_token.sum() / max(mask.sum(), 1.0))
    adv, m = rloo.advantages(per_func, weights, cfg.num_generations, kl=kl, beta=cfg.beta,
                             normalize=cfg.normalize_advantages)
  elif algo == 'grpo':
    adv, m = grpo.advantages(per_func, weights, cfg.num_generations, cfg.scale_rewards)
  metrics.update(m)
  if algo != 'ppo':  # PPO's are per token, from rollout_targets
    batch['advantages'] = adv.astype(np.float32)[:, None]
  for j, (name, _) in enumerate(fns):
    metrics[f'rewards/{name}/mean'] = float(per_func[:, j].mean())
    metrics[f'rewards/{name}/std'] = (float(np.std(per_func[:, j], ddof=1))
                                      if len(per_func) > 1 else 0.0)
  lengths = np.asarray([len(c) for c in roll.completion_ids])
  metrics.update({'completions/mean_length': float(lengths.mean()),
                  'completions/min_length': float(lengths.min()),
                  'completions/max_length': float(lengths.max()),
                  'completions/clipped_ratio': float(roll.truncated.mean())})
  return batch, metrics, (prompts, roll, per_func @ weights)


def train_rl(config, workdir: str) -> dict:
  """Trains `config` (train.objective 'grpo', 'rloo' or 'ppo') in `workdir`, resuming from its latest
  checkpoint. Returns the final metrics."""
  model_cfg, workdir = setup_workdir(config, workdir)
  cfg = grpo.RLConfig.from_config(config.rl)
  t = config.train
  say = print if jax.process_index() == 0 else (lambda *_: None)
  fns, weights = rewards_lib.load(config.rl.reward_fns, config.rl.get('reward_weights', ()))
  tokenizer = load_tokenizer(config, workdir)
  records, ids = tokenize_prompts(load_prompt_records(config), tokenizer,
                                  config.data.seq_len + 1 - cfg.max_completion_length, say)
  from llmjax.eval import suite
  eval_tasks = suite.load_tasks(config, tokenizer, model_cfg)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  trainer = make_trainer(config, model_cfg, mesh, rules)  # GRPO's loss: objectives.make_loss
  manager = checkpoint.make_manager(workdir, max_to_keep=t.max_to_keep)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = checkpoint.restore(manager, trainer.abstract_state)
    resumed = state is not None
    if not resumed:
      state = state_lib.build_state(trainer, config, model_cfg)
    ref_params = (state_lib.reference_params(trainer, config, model_cfg)
                  if trainer.reference == 'arg' else None)
    ref = () if ref_params is None else (ref_params,)
    checkpoint.write_model_config(workdir, model_cfg)
    if jax.process_index() == 0:
      files.write_text(files.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
    step = int(state.step)
    log = metrics_lib.MetricsLogger(workdir, t.steps, step)
    algo = objectives.objective(config)
    loss = {'grpo': f"loss {cfg.loss_type}", 'rloo': 'leave-one-out baseline',
            'ppo': f"GAE (gamma {cfg.gamma}, lambda {cfg.lam}) from the value head"}[algo]
    log.print(f"llmjax {algo.upper()}: {model_cfg.num_params:,} parameters, {len(records)}"
              f" prompts, {t.batch_size // cfg.num_generations} x {cfg.num_generations}"
              f" completions per rollout, {cfg.num_iterations} update(s) each, {loss}, mesh"
              f" {dict(mesh.shape)}" + (f", resuming at step {step}" if resumed else ""))
    logps_fn, rollout_ref = None, None
    apply = lambda p, x, **kw: trainer.model.apply({'params': p}, x, **kw)
    if algo == 'ppo':  # the old policy's log-probs and the critic's values, every rollout
      logps_fn = jax.jit(ppo.make_rollout_fn(cfg, apply, t.get('loss_chunk', 0)))
    elif cfg.uses_old_logps or algo == 'rloo':  # RLOO's ratio is always against them
      logps_fn = jax.jit(grpo.make_logps_fn(cfg, apply, t.get('loss_chunk', 0)))
    if algo in ('rloo', 'ppo') and cfg.beta:
      # The reference whose log-ratio joins the reward: the frozen copy, or a LoRA policy's
      # base with its adapters off (computed from the current params at each rollout).
      from llmjax.models import lora
      rollout_ref = ref_params if ref_params is not None else 'lora'
      disable = jax.jit(lora.disable)
    rollout_args = dict(config=config, cfg=cfg, model_cfg=model_cfg, records=records, ids=ids,
                        tokenizer=tokenizer, fns=fns, weights=weights, logps_fn=logps_fn,
                        batch_sharding=trainer.batch_sharding)
    latest, batch, roll_metrics, shown = {}, None, {}, None
    times = {'rollout': 0.0, 'update': 0.0}
    with _Preemption() as preempt:
      while step < t.steps:
        if step % cfg.num_iterations == 0 or batch is None:
          began = time.time()
          ref_now = disable(state.params) if rollout_ref == 'lora' else rollout_ref
          host, roll_metrics, shown = make_rollout_batch(step // cfg.num_iterations,
                                                         params=state.params, ref_params=ref_now,
                                                         **rollout_args)
          batch = _global_batch(host, trainer.batch_sharding)
          times['rollout'] += time.time() - began
        began = time.time()
        state, m = trainer.train_step(state, batch, *ref)
        step += 1
        log.step()
        row = {}
        if step % t.log_every == 0 or step == t.steps:
          m = jax.device_get(m)
          times['update'] += time.time() - began
          row = {'loss': float(m['loss']), 'grad_norm': float(m['grad_norm']),
                 **{k: float(v) for k, v in m.items() if k not in ('loss', 'grad_norm', 'weight')},
                 **roll_metrics, 'time/rollout_s': times['rollout'],
                 'time/update_s': times['update']}
          times = {'rollout': 0.0, 'update': 0.0}
          log.print(f"step {step}: loss {row['loss']:.4f} reward {row['reward']:.3f}"
                    f" (std {row['reward_std']:.3f}) length"
                    f" {row['completions/mean_length']:.1f}")
        else:
          jax.block_until_ready(state.step)
          times['update'] += time.time() - began
        if step % t.eval_every == 0 or step == t.steps:
          if eval_tasks:
            scores = suite.run_tasks(eval_tasks, config, model_cfg, state.params, tokenizer,
                                     step=step, workdir=workdir, write=jax.process_index() == 0)
            row.update(scores)
            log.print('  ' + ', '.join(f"{k[len('eval_'):]} {v:.3f}" for k, v in scores.items()))
          prompts, roll, total = shown
          for i in range(0, min(len(prompts), SAMPLES_SHOWN * cfg.num_generations),
                         cfg.num_generations):
            log.print(f"  sample: {prompts[i]!r} -> {roll.texts[i]!r} (reward {total[i]:.2f})"[:400])
        if row:
          log.write(step, row)
          latest.update(row)
        boundary = step % cfg.num_iterations == 0
        stop = boundary and (preempt.poll() or step == t.stop_at_step)
        if boundary and (step % t.checkpoint_every == 0 or step == t.steps or stop):
          checkpoint.save(manager, step, state, force=True)
        if stop:
          reason = 'train.stop_at_step' if step == t.stop_at_step else 'SIGTERM'
          log.print(f"{reason}: saved step {step}; exiting. Rerun the same command to resume.")
          break
  manager.wait_until_finished()
  manager.close()
  log.close()
  curves = [metrics_lib.plot_loss_curve(workdir), metrics_lib.plot_reward_curve(workdir)]
  if curves[0] and jax.process_index() == 0:
    print(f"loss and reward curves: {', '.join(curves)}")
  return {'step': step, **{k: float(v) for k, v in latest.items()}}
