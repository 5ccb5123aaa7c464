"""train_and_evaluate(config, workdir): the whole training job, readable top to bottom.

Sections: config and workdir, mesh, data, model and sharded state, checkpoint resume, the
jitted step, the loop (logging, eval, samples, checkpoints, preemption), the end of the run.
Pretraining and fine-tuning share this loop; they differ in `loss_fn` and the batches.
"""

import dataclasses
import functools
import math
import signal
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from llmjax import config as config_lib
from llmjax import files, sharding
from llmjax.errors import ConfigError
from llmjax.infer import sampler
from llmjax.models import lora
from llmjax.models.transformer import Transformer
from llmjax.train import checkpoint, losses, metrics as metrics_lib
from llmjax.train.optimizer import learning_rate_schedule, make_optimizer
from llmjax.train.state import TrainState
from llmjax.train.step import make_eval_step, make_train_step


class _Preemption:
  """Turns SIGTERM (TPU VM preemption, `kill`) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def unigram_baseline(train_batches, eval_batches, vocab_size: int) -> float:
  """Perplexity of a unigram model (add-one smoothed counts of training targets) on eval targets.

  The floor a language model must beat to show it learned more than token frequencies.
  """
  counts = np.ones(vocab_size, np.float64)
  for b in train_batches:
    np.add.at(counts, b['targets'][b['loss_mask'] > 0], 1)
  logp = np.log(counts / counts.sum())
  nll, n = 0.0, 0
  for b in eval_batches:
    t = b['targets'][b['loss_mask'] > 0]
    nll -= logp[t].sum()
    n += t.size
  return float(math.exp(nll / max(n, 1)))


def _global_batch(local: dict, batch_sharding) -> dict:
  """Host-local numpy rows -> global jax arrays sharded over the data-parallel axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The compiled pieces of a training job on one mesh (also used by `llmjax.plan`)."""
  model: Transformer
  optimizer: optax.GradientTransformation
  abstract_state: TrainState  # ShapeDtypeStructs carrying their target shardings
  state_shardings: TrainState  # NamedShardings
  batch_sharding: jax.sharding.NamedSharding
  init: Callable  # rng -> TrainState, created directly sharded
  train_step: Callable  # jitted (state, batch) -> (state, metrics), state donated
  eval_step: Callable  # jitted (params, batch) -> {'loss_sum', 'weight_sum'}


def make_trainer(config, model_cfg, mesh, rules, loss_fn=losses.next_token_loss) -> Trainer:
  """Builds the model, optimizer, sharded abstract state and the jitted steps for `mesh`.

  Parameters and optimizer state get their shardings from the logical axis names of the
  params (optax states mirror the params tree, so their moments inherit the same names).
  """
  # Divisibility of heads/MLP/vocab/batch by the mesh: one-line errors before tracing.
  sharding.check_mesh_fits(config, model_cfg, dict(mesh.shape))
  model = Transformer(model_cfg)
  optimizer = make_optimizer(config.train)
  loss_fn = functools.partial(loss_fn, loss_chunk=config.train.get('loss_chunk', 0))

  adapters_only = model_cfg.lora_rank > 0

  def init_state(rng):
    boxed = model.init(rng, jnp.zeros((1, 8), jnp.int32))['params']
    return TrainState.create(boxed, optimizer, rng, adapters_only=adapters_only)

  abstract = jax.eval_shape(init_state, jax.random.key(0))
  state_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(abstract), state_shardings)
  batch_sharding = sharding.batch_sharding(mesh)

  def apply_fn(params, tokens, **kw):
    return model.apply({'params': params}, tokens, **kw)

  init = jax.jit(lambda rng: nn.meta.unbox(init_state(rng)), out_shardings=state_shardings)
  train_step = jax.jit(
      make_train_step(apply_fn, loss_fn, optimizer, config.train.grad_accum, adapters_only),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
      donate_argnums=0)
  eval_step = jax.jit(make_eval_step(apply_fn, loss_fn),
                      in_shardings=(state_shardings.params, batch_sharding))
  return Trainer(model, optimizer, abstract, state_shardings, batch_sharding, init, train_step,
                 eval_step)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns final metrics."""
  # --- Config and workdir -------------------------------------------------------------------
  model_cfg = config_lib.validate(config)
  workdir = files.resolve(workdir)  # a local path or gs://; all its I/O goes through epath
  files.makedirs(workdir)
  checkpoint.check_model_matches(workdir, model_cfg)
  t = config.train

  # --- Mesh -----------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  data_parallel = mesh.shape['data'] * mesh.shape['fsdp']
  if t.batch_size % (data_parallel * t.grad_accum):
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by data x fsdp ="
                      f" {data_parallel} times train.grad_accum={t.grad_accum}; use a multiple"
                      f" of {data_parallel * t.grad_accum}.")

  # --- Data -----------------------------------------------------------------------------------
  from llmjax import data as data_lib  # imported here: tokenizer training may be slow to import
  data_cfg = config.data
  if config.init.get('hf_dir') and not data_cfg.tokenizer_path:
    data_cfg = data_cfg.copy_and_resolve_references()
    data_cfg.tokenizer_path = config.init.hf_dir  # the checkpoint's own token ids
  build = lambda: data_lib.build_data(
      data_cfg, workdir, seed=t.seed, batch_size=t.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  if jax.process_count() > 1:
    # Host 0 prepares the shared files (TFDS copy, tokenizer) while the others wait, so no two
    # hosts write them at once; the others then only read them. (With a gs:// workdir the TFDS
    # copy is on each host's local disk, so each host prepares its own in its build().)
    if jax.process_index() == 0:
      build()
    multihost_utils.sync_global_devices('llmjax: data prepared')
  tokenizer, train_ds, make_eval_batches = build()
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                      f"{model_cfg.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}.")
  train_iter = iter(train_ds)

  # --- Model, sharded state and the jitted steps -----------------------------------------------
  trainer = make_trainer(config, model_cfg, mesh, rules)
  state_shardings, batch_sharding = trainer.state_shardings, trainer.batch_sharding
  train_step, eval_step = trainer.train_step, trainer.eval_step
  schedule = learning_rate_schedule(t)

  # --- Checkpoint resume (restores straight into the target shardings) ------------------------
  manager = checkpoint.make_manager(workdir, max_to_keep=t.max_to_keep)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = checkpoint.restore(manager, trainer.abstract_state, train_iter)
    resumed = state is not None
    if state is None:
      state = trainer.init(jax.random.key(t.seed))
      if config.init.params_dir:  # fine-tuning: weights from another run's workdir
        params, _ = checkpoint.restore_params(config.init.params_dir)
        # A LoRA run's adapters are folded in: its merged model is what fine-tuning starts from.
        params, _ = lora.merge(params, checkpoint.read_model_config(config.init.params_dir))
        # The base from the checkpoint; with LoRA, fresh adapters from init.
        params = lora.with_base(state.params, params)
        state = state.replace(params=jax.device_put(params, state_shardings.params))
      elif config.init.get('hf_dir'):  # from released weights, each tensor read into its shard
        from llmjax.interop import hf
        family = hf.check_matches(config.init.hf_dir, model_cfg)
        base = hf.read_params(config.init.hf_dir, lora.without_lora(model_cfg), family,
                              shardings=lora.split(state_shardings.params)[1])
        state = state.replace(params=lora.with_base(state.params, base))
  checkpoint.write_model_config(workdir, model_cfg)
  start_step = int(state.step)

  def evaluate(params) -> dict:
    loss_sum, weight_sum = 0.0, 0.0
    for b in make_eval_batches():
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        aux = eval_step(params, _global_batch(b, batch_sharding))
      loss_sum += float(aux['loss_sum'])
      weight_sum += float(aux['weight_sum'])
    loss = loss_sum / max(weight_sum, 1.0)
    return {'eval_loss': loss, 'eval_perplexity': math.exp(min(loss, 50.0))}

  def print_samples(params, log):
    prompts = list(config.sample.prompts)
    if not prompts:
      return
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    ids = [bos + tokenizer.encode(p) for p in prompts]
    params_ = sampler.SamplingParams(max_new_tokens=config.sample.max_new_tokens,
                                     temperature=config.sample.temperature,
                                     top_k=config.sample.top_k, top_p=config.sample.top_p)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      outs = sampler.generate(model_cfg, params, ids, params_, eos_id=tokenizer.eos_id,
                              seed=t.seed)
    for p, o in zip(prompts, outs):
      log.print(f"  sample: {p}{tokenizer.decode(o)!r}"[:400])

  # --- Start-of-run report ---------------------------------------------------------------------
  tokens_per_step = t.batch_size * config.data.seq_len
  flops_per_token = model_cfg.flops_per_token(config.data.seq_len)
  peak = metrics_lib.device_peak_flops(t.get('peak_flops', 0.0)) * jax.device_count()
  log = metrics_lib.MetricsLogger(workdir, t.steps, start_step)
  if jax.process_index() == 0:
    files.write_text(files.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  if model_cfg.lora_rank:
    log.print(f"LoRA rank {model_cfg.lora_rank} on {','.join(model_cfg.lora_targets)}:"
              f" training {model_cfg.num_lora_params:,} adapter parameters, base frozen")
  log.print(f"llmjax: {model_cfg.num_params:,} parameters ({config.model.get('preset', 'custom')}),"
            f" {flops_per_token / 1e6:.1f} MFLOPs/token, mesh {dict(mesh.shape)},"
            f" {jax.device_count()} x {jax.devices()[0].device_kind}"
            + (f", resuming at step {start_step}" if resumed else ""))
  if not resumed and t.unigram_baseline_batches:
    base_iter = iter(train_ds)
    baseline = unigram_baseline((next(base_iter) for _ in range(t.unigram_baseline_batches)),
                                make_eval_batches(), tokenizer.vocab_size)
    log.print(f"unigram baseline: eval perplexity {baseline:.2f}")
    log.write(start_step, {'unigram_perplexity': baseline})

  # --- The loop --------------------------------------------------------------------------------
  last = {}
  step = start_step
  window_start, window_steps = time.time(), 0
  with _Preemption() as preempt, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    try:
      while step < t.steps:
        batch = _global_batch(next(train_iter), batch_sharding)
        state, m = train_step(state, batch)
        step += 1
        window_steps += 1
        log.step()
        if step % t.log_every == 0 or step == t.steps:
          m = jax.device_get(m)  # the only host sync outside eval and checkpoints
          dt = time.time() - window_start
          tps = tokens_per_step * window_steps / dt
          last = {'loss': m['loss'], 'grad_norm': m['grad_norm'], 'tokens_per_s': tps,
                  'lr': float(schedule(step))}
          if peak:
            last['mfu'] = tps * flops_per_token / peak
          window_start, window_steps = time.time(), 0
        if step % t.eval_every == 0 or step == t.steps:
          last.update(evaluate(state.params))
          log.print(f"step {step}: loss {last.get('loss', float('nan')):.4f}"
                    f" eval_loss {last['eval_loss']:.4f} eval_ppl {last['eval_perplexity']:.2f}")
          print_samples(state.params, log)
          window_start = time.time()
        if step % t.log_every == 0 or step % t.eval_every == 0 or step == t.steps:
          log.write(step, last)
          last = {k: v for k, v in last.items() if not k.startswith('eval_')}
        stop = preempt.requested or step == t.stop_at_step
        if step % t.checkpoint_every == 0 or step == t.steps or stop:
          checkpoint.save(manager, step, state, train_iter, force=True)
        if stop:
          log.print(f"{'SIGTERM' if preempt.requested else 'train.stop_at_step'}: saved step"
                    f" {step}; exiting. Rerun the same command to resume.")
          break
    except KeyboardInterrupt:
      checkpoint.save(manager, step, state, train_iter, force=True)
      log.print(f"interrupted: saved step {step}. Rerun the same command to resume.")
      manager.wait_until_finished()
      log.close()
      raise
  manager.wait_until_finished()
  manager.close()
  log.close()
  curve = metrics_lib.plot_loss_curve(workdir)
  if curve and jax.process_index() == 0:
    print(f"loss curve: {curve}")
  return {'step': step, **{k: float(v) for k, v in last.items()}}
