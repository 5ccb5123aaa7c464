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
from llmjax.models.config import ModelConfig

# Fields that change the shapes of the saved arrays; the others (dtype, attention
# implementation, remat, ...) can differ between a checkpoint and the run that resumes it.
_SHAPE_FIELDS = ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'head_dim',
                 'mlp_dim', 'norm', 'mlp', 'position', 'qkv_bias', 'out_bias', 'mlp_bias',
                 'tie_embeddings', 'scan_layers', 'lora_rank', 'lora_targets')


def _jsonable(value):
  return list(value) if isinstance(value, tuple) else value  # JSON reads tuples back as lists


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, as Orbax gets it: absolute when local, the URL itself for gs://."""
  return files.join(files.resolve(workdir), 'checkpoints')


def check_model_matches(workdir: str, model_cfg: ModelConfig) -> None:
  """Refuses to resume into a workdir whose checkpoints have other shapes (before any compute)."""
  path = files.join(workdir, 'model_config.json')
  if not files.exists(path):
    return
  saved = json.loads(files.read_text(path))
  diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {getattr(model_cfg, k)!r}"
           for k in _SHAPE_FIELDS
           if k in saved and saved[k] != _jsonable(getattr(model_cfg, k))]
  if model_cfg.position == 'learned' and saved.get('max_seq_len') != model_cfg.max_seq_len:
    diffs.append(f"max_seq_len: checkpoint {saved.get('max_seq_len')} vs config {model_cfg.max_seq_len}")
  if diffs and files.isdir(checkpoint_dir(workdir)):
    raise CheckpointError(
        f"workdir {workdir} holds checkpoints of a different model ({'; '.join(diffs)});"
        " use a new --workdir or restore the model config.")


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
  return ModelConfig.from_dict(json.loads(files.read_text(path)))


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
                          f" ({str(e).splitlines()[0][:200]}); it may be incomplete: delete that"
                          " step directory to resume from the previous one.") from None
  return restored['state']


def restore_params(workdir: str, abstract_params=None):
  """Params of the latest checkpoint in `workdir` (for generation and fine-tuning)."""
  manager = make_manager(workdir, max_to_keep=1, async_save=False)
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}; train first or pass the"
                          " right --workdir.")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  params = restored['state']['params']
  manager.close()
  return params, step
