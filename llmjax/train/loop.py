"""train_and_evaluate(config, workdir): the whole training job, readable top to bottom.

`train_and_evaluate` calls one named stage after another: the config and workdir, the mesh,
the data, the compiled step (`make_trainer`), the initial state (resume, or fresh, or the
params of a source checkpoint), the start-of-run report, the loop (logging, eval, samples,
checkpoints, preemption agreed by all hosts), and the end of the run. Pretraining and
fine-tuning share it; they differ in `loss_fn` and the batches.
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
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax import config as config_lib
from llmjax import files, sharding
from llmjax.errors import ConfigError
from llmjax.eval import suite
from llmjax.infer import sampler
from llmjax.models.config import ModelConfig
from llmjax.models.transformer import Transformer
from llmjax.models import lora
from llmjax.train import checkpoint, losses, metrics as metrics_lib, objectives
from llmjax.train import state as state_lib
from llmjax.train.optimizer import learning_rate_schedule, make_optimizer
from llmjax.train.state import TrainState
from llmjax.train.step import make_eval_step, make_train_step


class _Preemption:
  """Turns SIGTERM (TPU VM preemption, `kill`) into a stop that every host agrees on.

  Each host gets its own SIGTERM, at its own moment. Were each to stop when it sees its own,
  the first would enter the collective checkpoint save while the others start another step,
  and the job would hang. So with several processes every step contributes each host's flag to
  an all-reduce (a max over one int per device, launched asynchronously and read one step
  later so it never stalls the step pipeline), and all hosts stop at the step where they read
  a raised flag: the same step everywhere.
  """

  def __init__(self):
    self.requested = False
    self._old = None
    self._pending = None
    self._vote = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._old = None
    if jax.process_count() > 1:
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('devices',))
      self._sharding = NamedSharding(mesh, P('devices'))
      self._vote = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def poll(self) -> bool:
    """Called once per step on every host: True when all hosts should stop now."""
    if self._vote is None:
      return self.requested
    agreed = False
    if self._pending is not None:
      agreed = bool(jax.device_get(self._pending.addressable_data(0)))
    local = np.full((jax.local_device_count(),), int(self.requested), np.int32)
    self._pending = self._vote(jax.make_array_from_process_local_data(self._sharding, local))
    return agreed

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
  trainable: object  # bool pytree like the params (`state.trainable_mask`), None = all
  init: Callable  # rng -> TrainState, created directly sharded
  # (given params, rng) -> TrainState: `given` (a subset of the params' leaves, already placed
  # on their shardings, donated) completed by initialising only the leaves it lacks.
  init_from: Callable
  train_step: Callable  # jitted (state, batch[, ref_params]) -> (state, metrics), state donated
  eval_step: Callable  # jitted (params, batch[, ref_params]) -> LossOutput of sums
  # How the loss gets a reference model (DPO): '' none (or dpo.precompute_ref: the batches
  # carry its log-probs, `ref_logps`); 'arg' its params are the steps' third
  # argument (`state.reference_params`, sharded like the policy's); 'lora' the step derives
  # it from the params (the base with adapters off).
  reference: str = ''
  # (given params, rng) -> the reference's params (`state.reference_params`): `given` completed
  # like init_from's, adapters off for a LoRA model; params only, no optimizer state, shaped,
  # typed and sharded as `abstract_reference`.
  init_reference: Callable | None = None
  abstract_reference: object = None  # `state.reference_abstract` of the params


def make_trainer(config, model_cfg, mesh, rules, loss_fn=None, *, pad_id: int = -1) -> Trainer:
  """Builds the model, optimizer, sharded abstract state and the jitted steps for `mesh`.

  Parameters and optimizer state get their shardings from the logical axis names of the
  params (optax states mirror the params tree, so their moments inherit the same names).
  loss_fn: default the objective's (`objectives.make_loss`: train.objective, train.loss_chunk);
    a function given here gets `loss_chunk=train.loss_chunk`.
  pad_id: the tokenizer's pad id, for a reward model's read position (`objectives.make_loss`).
  """
  # Divisibility of heads/MLP/vocab/batch by the mesh: one-line errors before tracing.
  sharding.check_mesh_fits(config, model_cfg, dict(mesh.shape))
  model = Transformer(model_cfg)
  optimizer = make_optimizer(config.train)
  if loss_fn is None:
    loss_fn = objectives.make_loss(config, pad_id, model_cfg)
  else:
    loss_fn = functools.partial(loss_fn, loss_chunk=config.train.get('loss_chunk', 0))
  reference = ''
  if objectives.uses_reference(config) and not objectives.precomputes_reference(config):
    # A LoRA policy's reference is its own base (adapters off) unless another checkpoint is
    # named: no second copy of the weights.
    own = not (config.dpo.get('ref_hf_dir') or config.dpo.get('ref_params_dir'))
    reference = 'lora' if model_cfg.lora_rank and own else 'arg'

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, 8), jnp.int32))['params']

  trainable = state_lib.trainable_mask(model_cfg, jax.eval_shape(init_params, jax.random.key(0)))

  def init_state(rng):
    return TrainState.create(init_params(rng), optimizer, rng, trainable)

  abstract = jax.eval_shape(init_state, jax.random.key(0))
  state_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(abstract), state_shardings)
  batch_sharding = sharding.batch_sharding(mesh)

  def apply_fn(params, tokens, dropout_rng=None, **kw):
    if dropout_rng is None:  # evaluation, and training without dropout
      return model.apply({'params': params}, tokens, **kw)
    return model.apply({'params': params}, tokens, deterministic=False,
                       rngs={'dropout': dropout_rng}, **kw)

  def complete(given, rng):
    # Fresh values only where `given` has none: XLA drops the initialisers of every leaf that
    # `given` replaces, so a source checkpoint's params never sit beside a random copy.
    params = state_lib.combine(given, nn.meta.unbox(init_params(rng)))
    # DoRA magnitudes start at the norms of the given kernels, not of the random ones.
    params = lora.init_magnitudes(params, None, keep=given)
    return TrainState.create(params, optimizer, rng, trainable)

  abstract_reference = state_lib.reference_abstract(abstract.params, model_cfg)

  def reference_from(given, rng):
    params = state_lib.combine(given, nn.meta.unbox(init_params(rng)))
    params = lora.disable(params) if model_cfg.lora_rank else params
    return jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract_reference)

  init = jax.jit(lambda rng: nn.meta.unbox(init_state(rng)), out_shardings=state_shardings)
  init_from = jax.jit(complete, out_shardings=state_shardings, donate_argnums=0)
  init_reference = jax.jit(reference_from, out_shardings=state_shardings.params,
                           donate_argnums=0)
  reference_fn = lora.disable if reference == 'lora' else None
  ref_in = (state_shardings.params,) if reference == 'arg' else ()
  train_step = jax.jit(
      make_train_step(apply_fn, loss_fn, optimizer, config.train.grad_accum, trainable,
                      reference_fn, dropout=model_cfg.lora_dropout > 0),
      in_shardings=(state_shardings, batch_sharding) + ref_in,
      out_shardings=(state_shardings, None), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(apply_fn, loss_fn, reference_fn),
                      in_shardings=(state_shardings.params, batch_sharding) + ref_in)
  return Trainer(model, optimizer, abstract, state_shardings, batch_sharding, trainable, init,
                 init_from, train_step, eval_step, reference, init_reference, abstract_reference)


# ------------------------------------------------------------------------------------- stages


def setup_workdir(config, workdir: str) -> tuple[ModelConfig, str]:
  """Validates the whole config (one-line errors, before anything compiles), creates the
  workdir and refuses one that holds another model's checkpoints."""
  model_cfg = config_lib.validate(config)
  workdir = files.resolve(workdir)  # a local path or gs://; all its I/O goes through epath
  files.makedirs(workdir)
  checkpoint.check_model_matches(workdir, model_cfg)
  return model_cfg, workdir


@dataclasses.dataclass
class Input:
  tokenizer: object
  train_ds: object  # an IterDataset of host-local batches
  train_iter: object  # its checkpointable iterator
  eval_batches: Callable  # () -> list of host-local batches (cached); (full=True): all of them
  eval_tasks: list = dataclasses.field(default_factory=list)  # llmjax.eval.suite.Task, checked


def data_config(config):
  """config.data as the run reads it: a run that starts from other weights keeps their token
  ids, so the source's tokenizer is the run's unless data.tokenizer_path says otherwise."""
  from llmjax import data as data_lib  # imported here: tokenizer training may be slow to import
  data_cfg = config.data
  source_tokenizer = (config.init.get('hf_dir') or
                      (config.init.get('params_dir') and
                       data_lib.run_tokenizer_path(config.init.params_dir)))
  if source_tokenizer and not data_cfg.tokenizer_path:
    data_cfg = data_cfg.copy_and_resolve_references()
    data_cfg.tokenizer_path = source_tokenizer
  return data_cfg


def build_input(config, model_cfg: ModelConfig, workdir: str, ref_logps=None) -> Input:
  """The run's tokenizer and batches (each host reads its own share of the global batch).
  ref_logps: the precomputed reference tables (`llmjax.train.reference`), carried by the
  preference batches as `ref_logps`."""
  from llmjax import data as data_lib
  data_cfg, t = data_config(config), config.train
  build = lambda: data_lib.build_data(
      data_cfg, workdir, seed=t.seed, batch_size=t.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      ref_logps=ref_logps)
  if jax.process_count() > 1:
    # Host 0 prepares the shared files (TFDS copy, tokenizer) while the others wait, so no two
    # hosts write them at once; the others then only read them. (With a gs:// workdir the TFDS
    # copy is on each host's local disk, so each host prepares its own in its build().)
    if jax.process_index() == 0:
      build()
    multihost_utils.sync_global_devices('llmjax: data prepared')
  tokenizer, train_ds, eval_batches = build()
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                      f"{model_cfg.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}.")
  from llmjax.eval import suite
  template = None
  if data_cfg.get('format', 'text') == 'messages' or config.get('eval', {}).get('chat', False):
    from llmjax.data import chat
    template = chat.load_template(data_cfg, tokenizer)
  # Every eval file read and checked now, before the model is built.
  eval_tasks = suite.load_tasks(config, tokenizer, model_cfg, template)
  return Input(tokenizer, train_ds, iter(train_ds), eval_batches, eval_tasks)


def prompt_from_text(trainer: Trainer, state: TrainState, text: str, tokenizer) -> TrainState:
  """Step 0's prompt_embedding from the base embeddings of `text` (peft.prompt_init_text),
  tokenized as PEFT's TEXT init does: BOS first when the tokenizer has one."""
  from llmjax.models.transformer import init_prompt_from_tokens
  ids = ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + list(tokenizer.encode(text))
  init = jax.jit(lambda p: init_prompt_from_tokens(p, ids),
                 out_shardings=trainer.state_shardings.params, donate_argnums=0)
  return state.replace(params=init(state.params))


def initial_state(trainer: Trainer, config, model_cfg: ModelConfig, manager,
                  data_iter) -> tuple[TrainState, bool]:
  """(state, resumed): the workdir's latest checkpoint (restored straight into the target
  shardings, the data iterator with it), else step 0 of the run (`state_lib.build_state`)."""
  state = checkpoint.restore(manager, trainer.abstract_state, data_iter)
  if state is not None:
    return state, True
  return state_lib.build_state(trainer, config, model_cfg), False


def evaluate(eval_step, params, batches, batch_sharding, ref_params=None,
             finish: Callable = lambda m: m, perplexity: bool = True) -> dict:
  """eval_loss, eval_perplexity (a language model's: `perplexity`) and eval_<metric> for the
  loss's own metrics, with every sum added over all eval batches before one division.

  ref_params: the reference model's, for a loss that takes them (`Trainer.reference='arg'`).
  finish: reduced metrics -> reported ones (`objectives.finish_metrics`).
  """
  total = None
  ref = () if ref_params is None else (ref_params,)
  for b in batches:
    out = jax.device_get(eval_step(params, _global_batch(b, batch_sharding), *ref))
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), out)
    total = out if total is None else jax.tree.map(np.add, total, out)
  if total is None:  # data.eval_batches=0 or no validation split: nothing measured
    return {'eval_loss': float('nan'), **({'eval_perplexity': float('nan')} if perplexity else {})}
  reduced = finish({k: float(v) for k, v in losses.reduce_output(total).items()
                    if k != 'weight'})
  loss = reduced.pop('loss')
  out = {'eval_loss': loss}
  if perplexity:
    out['eval_perplexity'] = math.exp(min(loss, 50.0))
  return {**out, **{f'eval_{k}': v for k, v in reduced.items()}}


def evaluate_full_split(eval_step, params, batches, batch_sharding, tokenizer,
                        finish: Callable = lambda m: m) -> dict:
  """`evaluate` over every batch of the validation split (eval.full_split), plus
  eval_bits_per_char: the summed NLL in bits over the characters of the targets it scored,
  i.e. eval_loss / ln 2 x tokens / characters (= eval_loss / ln 2 for a char tokenizer).

  batches: host-local, the same number on every host (the last ones padded with empty rows).
  """
  counts = np.zeros(2, np.int64)  # [scored tokens, their characters] on this host

  def counted():
    for b in batches:
      scored = b['loss_mask'] > 0
      counts[0] += scored.sum()
      counts[1] += sum(len(tokenizer.decode(t[w])) for t, w in zip(b['targets'], scored))
      yield b

  out = evaluate(eval_step, params, counted(), batch_sharding, finish=finish)
  if jax.process_count() > 1:
    counts = multihost_utils.process_allgather(counts).reshape(-1, 2).sum(0)
  tokens, chars = int(counts[0]), int(counts[1])
  out['eval_bits_per_char'] = out['eval_loss'] * tokens / max(chars, 1) / math.log(2)
  return out


def full_split_batches(data: 'Input') -> list[dict]:
  """Every batch of the validation split, padded with empty batches to the count of the host
  that has most, so all hosts run the same eval steps."""
  batches = data.eval_batches(full=True)
  if jax.process_count() > 1 and batches:
    most = int(np.max(multihost_utils.process_allgather(np.int32(len(batches)))))
    empty = jax.tree.map(np.zeros_like, batches[0])
    batches = batches + [empty] * (most - len(batches))
  return batches


def print_samples(config, model_cfg, params, tokenizer, log) -> None:
  """Continuations of config.sample.prompts, printed at each eval."""
  prompts = list(config.sample.prompts)
  if not prompts:
    return
  bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
  ids = [bos + tokenizer.encode(p) for p in prompts]
  s = config.sample
  params_ = sampler.sample_params(s)
  outs = sampler.generate(model_cfg, params, ids, params_, eos_id=tokenizer.eos_id,
                          seed=config.train.seed)
  for p, o in zip(prompts, outs):
    log.print(f"  sample: {p}{tokenizer.decode(o)!r}"[:400])


def report_start(config, model_cfg, mesh, data: Input, log, start_step: int,
                 resumed: bool) -> None:
  """The start-of-run lines: parameters, FLOPs, mesh, and the unigram baseline of a new run."""
  t = config.train
  if jax.process_index() == 0:
    files.write_text(files.join(log.workdir, 'config.json'), config.to_json_best_effort(indent=2))
  if model_cfg.lora_rank:
    log.print(f"LoRA rank {model_cfg.lora_rank} on {','.join(model_cfg.lora_targets)}:"
              f" training {model_cfg.num_lora_params:,} adapter parameters, base frozen")
  if model_cfg.num_virtual_tokens:
    log.print(f"{config.peft.method}: {model_cfg.num_virtual_tokens} virtual tokens, training"
              f" {model_cfg.num_virtual_params:,} parameters, base frozen")
  preset = config.model.get('preset') or ('from init.hf_dir' if config.init.get('hf_dir')
                                           else 'custom')
  active = (f" ({model_cfg.num_active_params:,} active: top-{model_cfg.num_experts_per_tok} of"
            f" {model_cfg.num_experts} experts)" if model_cfg.num_experts else '')
  log.print(f"llmjax: {model_cfg.num_params:,} parameters{active} ({preset}),"
            f" {model_cfg.flops_per_token(config.data.seq_len) / 1e6:.1f} MFLOPs/token, mesh"
            f" {dict(mesh.shape)}, {jax.device_count()} x {jax.devices()[0].device_kind}"
            + (f", resuming at step {start_step}" if resumed else ""))
  if not resumed and t.unigram_baseline_batches:
    base_iter = iter(data.train_ds)
    baseline = unigram_baseline((next(base_iter) for _ in range(t.unigram_baseline_batches)),
                                data.eval_batches(), data.tokenizer.vocab_size)
    log.print(f"unigram baseline: eval perplexity {baseline:.2f}")
    log.write(start_step, {'unigram_perplexity': baseline})


def train_loop(config, model_cfg, trainer: Trainer, state: TrainState, data: Input, manager,
               log, ref_params=None) -> tuple[TrainState, int, dict]:
  """Steps until train.steps (or a stop); returns (state, last step, latest metrics).

  Each metrics.jsonl row holds what was measured at its step: train metrics at log steps
  (tokens/s over the steps since the last log, eval and sample time excluded), eval metrics
  at eval steps. ref_params: the reference model's (`Trainer.reference='arg'`).
  """
  ref = () if ref_params is None else (ref_params,)
  finish = functools.partial(objectives.finish_metrics, config)
  is_lm = objectives.objective(config) == 'lm'
  t = config.train
  schedule = learning_rate_schedule(t)
  tokens_per_step = t.batch_size * config.data.seq_len
  flops_per_token = model_cfg.flops_per_token(config.data.seq_len)
  peak = metrics_lib.device_peak_flops(t.get('peak_flops', 0.0)) * jax.device_count()
  latest = {}
  step = int(state.step)
  window_start, window_steps, paused = time.time(), 0, 0.0
  with _Preemption() as preempt:
    try:
      while step < t.steps:
        batch = _global_batch(next(data.train_iter), trainer.batch_sharding)
        state, m = trainer.train_step(state, batch, *ref)
        step += 1
        window_steps += 1
        log.step()
        row = {}
        if step % t.log_every == 0 or step == t.steps:
          m = finish(jax.device_get(m))  # the only host sync outside eval and checkpoints
          tps = tokens_per_step * window_steps / max(time.time() - window_start - paused, 1e-9)
          row = {'loss': m['loss'], 'grad_norm': m['grad_norm'], 'tokens_per_s': tps,
                 'lr': float(schedule(step - 1)),  # the rate this step's update used
                 **{k: v for k, v in m.items() if k not in ('loss', 'grad_norm', 'weight')
                    and not k.startswith(losses.EVAL_ONLY_PREFIX)}}
          if peak:
            row['mfu'] = tps * flops_per_token / peak
          window_start, window_steps, paused = time.time(), 0, 0.0
        if step % t.eval_every == 0 or step == t.steps:
          began = time.time()
          if step == t.steps and config.get('eval', {}).get('full_split', False):  # LM only
            row.update(evaluate_full_split(trainer.eval_step, state.params,
                                           full_split_batches(data), trainer.batch_sharding,
                                           data.tokenizer, finish))
          else:
            row.update(evaluate(trainer.eval_step, state.params, data.eval_batches(),
                                trainer.batch_sharding, ref_params, finish, perplexity=is_lm))
          shown = (f" eval_ppl {row['eval_perplexity']:.2f}" if is_lm else
                   ''.join(f" eval_{k} {row['eval_' + k]:.3f}" for k in
                           ('rewards/accuracies', 'accuracy') if 'eval_' + k in row))
          if 'eval_bits_per_char' in row:
            shown += f" eval_bits_per_char {row['eval_bits_per_char']:.4f} (whole split)"
          log.print(f"step {step}: loss {row.get('loss', latest.get('loss', float('nan'))):.4f}"
                    f" eval_loss {row['eval_loss']:.4f}{shown}")
          if data.eval_tasks:
            scores = suite.run_tasks(data.eval_tasks, config, model_cfg, state.params,
                                     data.tokenizer, step=step, workdir=log.workdir,
                                     write=jax.process_index() == 0)
            row.update(scores)
            log.print('  ' + ', '.join(f"{k[len('eval_'):]} {v:.3f}" for k, v in scores.items()))
          print_samples(config, model_cfg, state.params, data.tokenizer, log)
          paused += time.time() - began
        if row:
          log.write(step, row)
          latest.update(row)
        stop = preempt.poll() or step == t.stop_at_step
        if step % t.checkpoint_every == 0 or step == t.steps or stop:
          checkpoint.save(manager, step, state, data.train_iter, force=True)
        if stop:
          reason = 'train.stop_at_step' if step == t.stop_at_step else 'SIGTERM'
          log.print(f"{reason}: saved step {step}; exiting. Rerun the same command to resume.")
          break
    except KeyboardInterrupt:
      checkpoint.save(manager, step, state, data.train_iter, force=True)
      log.print(f"interrupted: saved step {step}. Rerun the same command to resume.")
      manager.wait_until_finished()
      log.close()
      raise
  return state, step, latest


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns final metrics."""
  model_cfg, workdir = setup_workdir(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  data = build_input(config, model_cfg, workdir)
  trainer = make_trainer(config, model_cfg, mesh, rules,
                         pad_id=getattr(data.tokenizer, 'pad_id', -1))
  manager = checkpoint.make_manager(workdir, max_to_keep=config.train.max_to_keep)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if objectives.precomputes_reference(config):
      from llmjax.train import reference  # imports the data pipeline
      # Before the policy is built, so the reference's weights are gone when it is.
      say = print if jax.process_index() == 0 else (lambda *_: None)
      tables = reference.precomputed_logps(trainer, config, model_cfg, data_config(config),
                                           workdir, say)
      data = build_input(config, model_cfg, workdir, ref_logps=tables)
    state, resumed = initial_state(trainer, config, model_cfg, manager, data.train_iter)
    if not resumed and config.get('peft', {}).get('prompt_init_text'):
      state = prompt_from_text(trainer, state, config.peft.prompt_init_text, data.tokenizer)
    ref_params = (state_lib.reference_params(trainer, config, model_cfg)
                  if trainer.reference == 'arg' else None)
    checkpoint.write_model_config(workdir, model_cfg)
    start_step = int(state.step)
    log = metrics_lib.MetricsLogger(workdir, config.train.steps, start_step)
    report_start(config, model_cfg, mesh, data, log, start_step, resumed)
    state, step, latest = train_loop(config, model_cfg, trainer, state, data, manager, log,
                                     ref_params)
  manager.wait_until_finished()
  manager.close()
  log.close()
  curve = metrics_lib.plot_loss_curve(workdir)
  if curve and jax.process_index() == 0:
    print(f"loss curve: {curve}")
  return {'step': step, **{k: float(v) for k, v in latest.items()}}
