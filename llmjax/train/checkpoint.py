"""Orbax checkpoints of the train state and the data iterator, with automatic resume.

Layout of a workdir:
    WORKDIR/checkpoints/<step>/state   params, optimizer state, step, rng (sharded arrays)
    WORKDIR/checkpoints/<step>/data    the Grain iterator state (per host)
    WORKDIR/model_config.json          the ModelConfig the checkpoints belong to

Saving is asynchronous: the step loop continues while arrays are written. All hosts call
save/restore (Orbax coordinates them); restore targets the *current* shardings, so a
checkpoint can be restored onto a different mesh. The workdir may be local or gs://: Orbax
writes gs:// natively (tensorstore's GCS driver), the JSON files go through `llmjax.files`.
"""

import dataclasses
import json

import grain
import jax
import orbax.checkpoint as ocp

from llmjax import files
from llmjax.errors import CheckpointError
from llmjax.models.config import ModelConfig, check_architecture

# Runtime fields that still change the saved arrays (scan stacking, adapters) or what the
# trained adapters mean (their scale): a resumed run must keep them.
_RESUME_FIELDS = ('scan_layers', 'lora_rank', 'lora_alpha', 'lora_targets', 'lora_ranks',
                  'use_dora', 'use_rslora', 'virtual_tokens', 'num_virtual_tokens', 'base_quant',
                  'quant_block_size', 'quant_double', 'value_head')


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, as Orbax gets it: absolute when local, the URL itself for gs://."""
  return files.join(files.resolve(workdir), 'checkpoints')


def check_model_matches(workdir: str, model_cfg: ModelConfig) -> None:
  """Refuses to resume into a workdir whose checkpoints hold another model (before any compute).

  Same comparator as `init.params_dir` and `init.hf_dir` (`models.config.architecture_diffs`),
  plus the fields that shape the saved arrays.
  """
  path = files.join(workdir, 'model_config.json')
  if not files.exists(path) or not files.isdir(checkpoint_dir(workdir)):
    return
  check_architecture(read_model_config(workdir), model_cfg, key=f"--workdir={workdir}",
                     source_name='the saved model_config.json', also=_RESUME_FIELDS,
                     fix="Use a new --workdir or restore the model config.",
                     error=CheckpointError)


def write_model_config(workdir: str, model_cfg: ModelConfig) -> None:
  """Writes WORKDIR/model_config.json (process 0 only), which generate and resume read back."""
  if jax.process_index() == 0:
    files.write_text(files.join(workdir, 'model_config.json'),
                     json.dumps(dataclasses.asdict(model_cfg), indent=2))


def read_model_config(workdir: str) -> ModelConfig:
  """The ModelConfig that `write_model_config` stored in `workdir`."""
  path = files.join(workdir, 'model_config.json')
  if not files.exists(path):
    raise CheckpointError(f"{path} not found: {workdir} is not an llmjax workdir; train into it"
                          " first or pass the right --workdir.")
  try:
    return ModelConfig.from_dict(json.loads(files.read_text(path)))
  except (ValueError, TypeError) as e:  # ConfigError is a ValueError too
    raise CheckpointError(f"{path} is not a valid llmjax model config"
                          f" ({str(e).splitlines()[0][:200]}); restore it from the run.") from None


def write_params_workdir(workdir: str, model_cfg: ModelConfig, params) -> None:
  """A workdir holding only params at step 0 (`llmjax.convert --from=hf` output): its
  model_config.json and checkpoints/0/state = {'params': params}, which `init.params_dir`,
  `restore_params`, generate and `convert --to=hf` read like a training run's."""
  files.makedirs(workdir)
  write_model_config(workdir, model_cfg)
  manager = make_manager(workdir, max_to_keep=1, async_save=False)
  save(manager, 0, {'params': params}, force=True)
  manager.wait_until_finished()
  manager.close()


def make_manager(workdir: str, *, max_to_keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  """An Orbax manager of WORKDIR/checkpoints (items 'state' and 'data'), created if absent."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state, data_iter=None, *, force=False) -> bool:
  items = {'state': ocp.args.StandardSave(state)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state, data_iter=None, step=None):
  """Restores the latest (or given) step into `abstract_state`'s shapes and shardings.

  `data_iter` is restored in place. Returns the state, or None when there is no checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"checkpoint step {step} in {manager.directory} could not be restored"
                          f" ({_one_line(e)}); it may be incomplete: delete that"
                          " step directory to resume from the previous one.") from None
  return restored['state']


def _one_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def latest_step(workdir: str) -> int:
  """The latest checkpointed step in `workdir`; CheckpointError (never a created directory)
  when there is none."""
  directory = checkpoint_dir(workdir)
  manager = None
  if files.isdir(directory):
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False))
  step = manager.latest_step() if manager is not None else None
  if manager is not None:
    manager.close()
  if step is None:
    raise CheckpointError(f"no checkpoint in {directory}; train or convert into {workdir} first,"
                          " or pass the right path.")
  return step


def restore_params(workdir: str, abstract_params=None, step: int | None = None):
  """Only the params of a checkpoint in `workdir` (latest step, or `step`): never its optimizer
  state. Returns (params, step).

  abstract_params: a pytree of `jax.ShapeDtypeStruct`s (with shardings) to read into: each
    array is read straight into its sharding and cast to its dtype on the way (a bf16 export
    becomes float32 master weights, and no second copy exists). None: the saved shapes and
    dtypes on the default device.
  """
  step = latest_step(workdir) if step is None else step
  # PyTreeCheckpointHandler reads what StandardSave wrote and can restore a subtree.
  manager = ocp.CheckpointManager(
      checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler()})
  try:
    if abstract_params is None:
      saved = manager.item_metadata(step)['state'].tree['params']
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      abstract_params = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    target = {'params': abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    raise CheckpointError(f"the params of checkpoint step {step} in {checkpoint_dir(workdir)}"
                          f" could not be read ({_one_line(e)}); is the step complete and of"
                          " this model?") from None
  finally:
    manager.close()
  return restored['state']['params'], step
