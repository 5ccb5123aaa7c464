"""The train state: everything a step reads and writes, and everything a checkpoint saves
besides the data iterator; and which of its params are trained.

Trainable and frozen parameters are one mechanism: a pytree of bools shaped like the params
(`trainable_mask`) splits them (`split`) into the leaves the step differentiates and updates
(and keeps optimizer state for) and the constants it only reads; `combine` puts them back.
LoRA trains its adapters only, plus a reward model's score head and PPO's value head (a fresh
head cannot be a frozen constant; TRL's advice for LoRA reward models is the same:
modules_to_save=["score"]).
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from llmjax.models import axes as axes_lib
from llmjax.models import lora
from llmjax.models.config import ModelConfig


# Top-level heads a run may add to its source's trunk: trained even when the base is frozen.
NEW_HEADS = ('score', 'value_head')


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # uint32 [2] raw key data, so checkpoints hold a plain array

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, rng: jax.Array,
             trainable=None) -> 'TrainState':
    """A fresh state at step 0; optimizer state only for the `trainable` leaves (None: all)."""
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               opt_state=optimizer.init(split(params, trainable)[0]),
               rng=jax.random.key_data(rng))


def trainable_mask(cfg: ModelConfig, params):
  """Which leaves of `params` (any params-shaped pytree: arrays, structs, specs) are trained:
  with LoRA only the adapters (and a `score` or `value_head` head), otherwise all; None when all
  are (no split needed)."""
  if not cfg.frozen_base:  # LoRA, DoRA or virtual tokens (`lora.ADAPTER_LEAVES`)
    return None
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: lora.is_adapter(p) or p[0] in NEW_HEADS
                                       for p in flat})


def split(params, mask) -> tuple[dict, dict]:
  """params -> (trainable, frozen): two nested dicts partitioning the leaves by `mask`
  (a bool pytree shaped like params; None: everything trainable, nothing frozen)."""
  if mask is None:
    return params, {}
  flat = traverse_util.flatten_dict(params)
  keep = traverse_util.flatten_dict(mask)
  train = {p: v for p, v in flat.items() if keep[p]}
  frozen = {p: v for p, v in flat.items() if not keep[p]}
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def combine(trainable: dict, frozen: dict) -> dict:
  """The inverse of `split`."""
  if not frozen:
    return trainable
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------------ the state builder


def build_state(trainer, config, model_cfg: ModelConfig) -> TrainState:
  """Step 0 of a run: the one builder for a fresh init, `init.params_dir` and `init.hf_dir`.

  From a source checkpoint only the params are read (never its optimizer state), each array
  straight into its target sharding and `model.param_dtype` (a bf16 export trains float32
  master weights when the experiment says float32); only what the source lacks (LoRA
  adapters; later value and reward heads) is initialised, and no random copy of what it has
  ever exists (`Trainer.init_from`). The architecture was checked against the source before
  anything compiled (`config.validate`, one comparator: `models.config.architecture_diffs`).
  """
  rng = jax.random.key(config.train.seed)
  init = config.get('init', {})
  if not init.get('params_dir') and not init.get('hf_dir'):
    return trainer.init(rng)
  given = source_params(trainer.abstract_state.params, model_cfg,
                        hf_dir=init.get('hf_dir', ''), params_dir=init.get('params_dir', ''),
                        peft_dir=init.get('peft_dir', ''))
  return trainer.init_from(given, rng)


def source_params(abstract_params, model_cfg: ModelConfig, *, hf_dir: str = '',
                  params_dir: str = '', peft_dir: str = '') -> dict:
  """The leaves a source checkpoint supplies (everything but LoRA adapters, and a score head
  new on an LM source) of an HF dir or an llmjax workdir, each read straight into the sharding
  and dtype of `abstract_params`; with `peft_dir` (over hf_dir) the adapters too, from that
  PEFT LoRA adapter dir (checked by `config.validate`)."""
  adapters_abstract, base_abstract = lora.split(abstract_params)
  if model_cfg.value_head and not (params_dir and checkpoint_has_value_head(params_dir)):
    # PPO's value head is new on an SFT or HF trunk: initialised by the caller, not read.
    base_abstract = {k: v for k, v in base_abstract.items() if k != 'value_head'}
    model_cfg = dataclasses.replace(model_cfg, value_head=False)
  if model_cfg.base_quant:
    # QLoRA: the source's float kernels are read (from an HF dir into host memory where the
    # platform has it) and quantized one leaf at a time on the devices.
    float_abstract = _float_base_abstract(base_abstract, model_cfg, host=bool(hf_dir))
    if params_dir:
      base = _params_from_workdir(params_dir, model_cfg, float_abstract)
    else:
      from llmjax.interop import hf
      family = hf.check_matches(hf_dir, model_cfg)
      shardings = jax.tree.map(lambda a: a.sharding, float_abstract)
      base = hf.read_params(hf_dir, lora.without_lora(model_cfg), family, shardings=shardings)
    base = quantize_leafwise(base, model_cfg, base_abstract)
    if not peft_dir:
      return base
  elif params_dir:
    return _params_from_workdir(params_dir, model_cfg, base_abstract)
  else:
    from llmjax.interop import hf
    family = hf.check_matches(hf_dir, model_cfg)
    shardings = jax.tree.map(lambda a: a.sharding, base_abstract)
    base = hf.read_params(hf_dir, lora.without_lora(model_cfg), family, shardings=shardings)
  if not peft_dir:
    return base
  from llmjax.interop import peft
  # Adapters are a few MB: read whole on every host, each device's block cut from them.
  adapters = peft.read_adapters(peft_dir, model_cfg, peft.check_adapter(peft_dir, model_cfg))
  adapters = jax.tree.map(
      lambda x, a: jax.make_array_from_callback(a.shape, a.sharding,
                                                lambda index: x.astype(a.dtype)[index]),
      adapters, adapters_abstract)
  return lora.combine(adapters, base)


def checkpoint_has_value_head(workdir: str) -> bool:
  from llmjax.train import checkpoint
  return checkpoint.read_model_config(workdir).value_head


def _float_base_abstract(base_abstract, model_cfg: ModelConfig, host: bool = False):
  """The float base's abstract params for a QLoRA model's `base_abstract` (its quantized
  leaves): each quantized projection's leaves replaced by its 'kernel' in model.param_dtype,
  sharded as its packed leaf (`kernel_nf4` / `kernel_int8` keep the kernel's leading axes and
  their mesh axes, so that PartitionSpec padded with None places the kernel), in pinned host
  memory with `host` where the devices have it (the whole float model need not fit on them)."""
  from llmjax.models import layers
  specs = lora.kernel_specs(model_cfg)
  flat = traverse_util.flatten_dict(base_abstract)
  out = {p: a for p, a in flat.items() if p[-1] not in layers.QUANT_LEAVES}
  for path, a in flat.items():
    if path[-1] not in layers.QUANT_VALUE_LEAVES:
      continue
    shape, names = specs[path[:-1] + ('kernel',)]
    spec = tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
    if path[-1] == 'kernel_int4':  # [s..., in / 2, out...]: the first input axis keeps its
      # mesh axis, the other input axes (flattened into it) none
      stacked = sum(1 for n in names if n == axes_lib.LAYERS)
      extra = len(shape) - a.ndim
      spec = spec[:stacked + 1] + (None,) * extra + spec[stacked + 1:]
    spec = spec + (None,) * (len(shape) - len(spec))
    kind = None
    if host and 'pinned_host' in {m.kind for m in a.sharding.mesh.devices.flat[0]
                                  .addressable_memories()}:
      kind = 'pinned_host'
    sharding = jax.sharding.NamedSharding(a.sharding.mesh, jax.sharding.PartitionSpec(*spec),
                                          memory_kind=kind)
    out[path[:-1] + ('kernel',)] = jax.ShapeDtypeStruct(shape, jnp.dtype(model_cfg.param_dtype),
                                                         sharding=sharding)
  return traverse_util.unflatten_dict(out)


def quantize_leafwise(params: dict, model_cfg: ModelConfig, abstract: dict) -> dict:
  """`params` (a float base) with every kernel that model.base_quant stores quantized
  replaced by its quantized leaves, placed as `abstract` says. One jitted call per kernel, the
  float kernel moved to device memory first and released after: at most one float kernel
  (one stacked [layers, ...] leaf under scan) sits on the devices at a time (when `params`
  is in host memory)."""
  quantize = lora.quantizer(model_cfg)
  target = traverse_util.flatten_dict(abstract)
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    leaves = jax.eval_shape(lambda k: quantize(path, k), value)
    if leaves is None:
      out[path] = value
      continue
    shardings = {p: target[p].sharding for p in leaves}
    on_device = jax.device_put(value, value.sharding.with_memory_kind('device'))
    del value
    # (No donation: the quantized leaves are other dtypes, so they cannot reuse its buffer;
    # dropping the last reference frees it.)
    out.update(jax.jit(lambda k: quantize(path, k), out_shardings=shardings)(on_device))
    del on_device
  return traverse_util.unflatten_dict(out)


# The leaves that every use casts to model.dtype first (DenseGeneral's kernels, the token
# embedding and the tied head): a frozen reference holds them in that dtype and computes the
# same values, at half the memory of float32 master weights in a bf16 run. Norm scales and
# biases (a few KB; LayerNorm reads its in float32) keep param_dtype.
REFERENCE_CAST_LEAVES = ('kernel', 'embedding')


def reference_abstract(abstract_params, model_cfg: ModelConfig):
  """The reference model's params as ShapeDtypeStructs: `abstract_params` (sharded like the
  policy's) with REFERENCE_CAST_LEAVES in model.dtype when that is narrower."""
  compute = jnp.dtype(model_cfg.dtype)
  flat = traverse_util.flatten_dict(abstract_params)

  def cast(path, a):
    narrower = (path[-1] in REFERENCE_CAST_LEAVES and jnp.issubdtype(a.dtype, jnp.floating)
                and compute.itemsize < jnp.dtype(a.dtype).itemsize)
    return jax.ShapeDtypeStruct(a.shape, compute if narrower else a.dtype, sharding=a.sharding)

  return traverse_util.unflatten_dict({p: cast(p, a) for p, a in flat.items()})


def reference_source(config) -> tuple[str, str]:
  """(hf_dir, params_dir) of a DPO run's reference checkpoint, at most one set; both '' for
  the initialisation of train.seed. `reference_params` reads it."""
  init, dpo = config.get('init', {}), config.dpo
  hf_dir = dpo.get('ref_hf_dir', '') or (init.get('hf_dir', '') if not dpo.get('ref_params_dir')
                                         else '')
  params_dir = dpo.get('ref_params_dir', '') or (init.get('params_dir', '') if not hf_dir else '')
  return hf_dir, params_dir


def reference_params(trainer, config, model_cfg: ModelConfig) -> dict:
  """A DPO run's frozen reference model: params only (no optimizer state, no train state),
  sharded like the policy's.

  dpo.ref_hf_dir / dpo.ref_params_dir when set, else the policy's own initial weights (its
  init.hf_dir / init.params_dir, read again: on a resumed run the policy has moved on; a run
  with no source: the initialisation of train.seed). A LoRA policy's reference has its
  adapters off (`lora.disable`), so it computes the base model.
  """
  hf_dir, params_dir = reference_source(config)
  given = {}
  if hf_dir or params_dir:
    given = source_params(trainer.abstract_state.params, model_cfg, hf_dir=hf_dir,
                          params_dir=params_dir)
  return trainer.init_reference(given, jax.random.key(config.train.seed))


def _params_from_workdir(workdir: str, model_cfg: ModelConfig, base_abstract):
  """The base params of another run's latest checkpoint, shaped and placed like
  `base_abstract`; a LoRA run's adapters are folded in (its merged model is what it learned)."""
  from llmjax.train import checkpoint
  source = checkpoint.read_model_config(workdir)
  check_params_dir(workdir, model_cfg, source)
  if model_cfg.head == 'score' and source.head == 'lm':  # the score head is new: not read
    base_abstract = {k: v for k, v in base_abstract.items() if k != 'score'}
    source = dataclasses.replace(source, head='score')
  if not source.lora_rank:
    params, _ = checkpoint.restore_params(workdir, base_abstract)
    return params
  # Adapters (small, float32, replicated) with the base in the source's own dtype, merged in
  # float32, then cast to the target dtype: one rounding, as if the source had been merged.
  mesh = jax.tree.leaves(base_abstract)[0].sharding.mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  from llmjax.models.transformer import init_params
  adapters, source_base = lora.split(jax.eval_shape(lambda: init_params(source,
                                                                        jax.random.key(0))))
  adapters = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          adapters)
  base = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(source.param_dtype),
                                                     sharding=a.sharding), base_abstract)
  if source.base_quant:  # a QLoRA run: its packed leaves (replicated), dequantized by merge
    base = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        source_base)
  params, _ = checkpoint.restore_params(workdir, lora.combine(adapters, base))
  shardings = jax.tree.map(lambda a: a.sharding, base_abstract)
  merge = jax.jit(lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype),
                                         lora.merge(p, source)[0], base_abstract),
                  out_shardings=shardings)
  return merge(params)


def check_params_dir(workdir: str, model_cfg: ModelConfig, source: ModelConfig | None = None):
  """One-line ConfigError unless `workdir` (init.params_dir) holds this architecture."""
  from llmjax.models.config import check_architecture
  from llmjax.train import checkpoint
  source = source or checkpoint.read_model_config(workdir)
  if model_cfg.head == 'score' and source.head == 'lm':  # a reward model on an LM's trunk
    source = dataclasses.replace(source, head='score')
  # scan_layers decides how the saved arrays are stacked, so it must match too.
  check_architecture(source, model_cfg, key='init.params_dir',
                     source_name=f'{workdir}/model_config.json', also=('scan_layers',),
                     fix="Start from a run of this architecture, or set those keys.")
