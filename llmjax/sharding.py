"""Device mesh and the logical-axis -> mesh-axis rules, both from config.

Layers name their dimensions logically (`llmjax.models.axes`); `config.sharding.rules` maps
those names to mesh axes. Nothing outside this module (and the config) knows about the mesh.

The mesh has five named axes, outermost first:
    data    pure data parallelism: params replicated, batch split (across slices: only the
            gradient all-reduce crosses the slow data-centre network)
    fsdp    data parallelism with params and optimizer state split too (ZeRO-3): weights are
            all-gathered layer by layer in the forward/backward pass
    sequence  context parallelism: each row's positions split
    expert  expert parallelism for MoE models: the stacked expert weights (logical 'expert')
            and their optimizer state split over it, and the batch too, so its devices do
            data-parallel work on the rest of the model (for a dense model it is one more
            data-parallel axis). How the experts' compute is partitioned is GSPMD's: see
            the README's MoE section.
    tensor  Megatron-style model parallelism: heads and the MLP width split, activations
            all-reduced twice per block; innermost, so it rides the fastest ICI links
`mesh.<axis>` is the size within one slice (ICI); `mesh.dcn_<axis>` the number of slices along
that axis (multi-slice, over DCN); the mesh axis is their product.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llmjax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'sequence', 'expert', 'tensor')
# The axes the global batch is split over (expert too: an expert-parallel device computes the
# attention and dense layers of its own rows).
DATA_AXES = ('data', 'fsdp', 'expert')

# Logical -> mesh rules. A logical name maps to a mesh axis (or a tuple of them, or None:
# replicated). Flax takes, per dimension, the first rule whose mesh axes are not already used by
# an earlier dimension of the same tensor: activations [batch, length, embed] put batch on
# (data, fsdp), so their embed stays whole although weights' embed goes to fsdp.
# Every rule set splits activations' `length` over `sequence` (context parallelism for long
# rows): with mesh.sequence=1 that is a no-op. Attention then needs all keys: XLA gathers them,
# and the Pallas kernels get the whole K/V with their queries' offset (`kernels/sharded.py`).
SEQUENCE = ('length', 'sequence')
# The KV cache's slots go where the activations' length goes: a long context's cache is split
# too, and decoding attends to each device's slots in place (`kernels.sharded`).
KV_SEQUENCE = ('kv_length', 'sequence')
# MoE expert weights [expert, embed, mlp] split by expert over `expert` in every rule set
# (mesh.expert=1: a no-op); their embed / mlp dims then follow the set's other rules.
EXPERT = ('expert', 'expert')
DATA_PARALLEL = (
    ('batch', DATA_AXES),  # everything else replicated: the mesh's fsdp axis is data parallel too
    SEQUENCE,
    KV_SEQUENCE,
    EXPERT,
)
FSDP = (
    ('batch', DATA_AXES),
    SEQUENCE,
    KV_SEQUENCE,
    EXPERT,
    ('embed', 'fsdp'),  # ZeRO-3: every weight (and its Adam moments) split along the model width
    ('vocab', 'tensor'),  # only the embedding/LM head use tensor here (mesh.tensor is usually 1)
)
FSDP_TENSOR = (
    ('batch', DATA_AXES),
    SEQUENCE,
    KV_SEQUENCE,
    EXPERT,
    ('heads', 'tensor'),  # Megatron-style: attention heads and the MLP width split over tensor,
    ('kv_heads', 'tensor'),  # so each block needs one all-reduce forward, one backward
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),  # logits [batch, length, vocab] split too: the largest activation
    ('embed', 'fsdp'),  # and the other dimension of each weight over fsdp (ZeRO-3)
)
RULES = {'data': DATA_PARALLEL, 'fsdp': FSDP, 'fsdp_tensor': FSDP_TENSOR}

# Which model key sizes each logical parameter dimension, for divisibility messages.
_MODEL_DIMS = {'embed': 'embed_dim', 'heads': 'num_heads', 'kv_heads': 'num_kv_heads',
               'mlp': 'mlp_dim', 'vocab': 'vocab_size', 'head_dim': 'head_dim',
               'layers': 'num_layers', 'expert': 'num_experts'}


def _sizes(mesh_cfg, prefix: str) -> dict[str, int]:
  return {a: int(mesh_cfg.get(prefix + a, 1)) for a in MESH_AXES}


def num_slices(mesh_cfg) -> int:
  """Slices the config asks for: the product of mesh.dcn_* (1 = single slice)."""
  dcn = _sizes(mesh_cfg, 'dcn_')
  for a, s in dcn.items():
    if s < 1:
      raise ConfigError(f"mesh.dcn_{a}={s} must be >= 1 (the number of slices along {a}).")
  return math.prod(dcn.values())


def mesh_shape(mesh_cfg, num_devices: int, slices: int | None = None) -> dict[str, int]:
  """Axis sizes (ICI x DCN) from config; one ICI axis may be -1: inferred. Checks the product.

  `slices`: how many slices the devices form (None: trust mesh.dcn_*).
  """
  dcn = _sizes(mesh_cfg, 'dcn_')
  n_slices = num_slices(mesh_cfg)
  if slices is not None and slices != n_slices:
    raise ConfigError(
        f"mesh: the product of mesh.dcn_* = {n_slices} but the devices form {slices}"
        f" slice(s); set mesh.dcn_data={slices} (data parallel across slices).")
  if num_devices % n_slices:
    raise ConfigError(f"mesh: {num_devices} devices do not split into {n_slices} slices;"
                      " make the mesh.dcn_* product divide the device count.")
  per_slice = num_devices // n_slices
  sizes = _sizes(mesh_cfg, '')
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"mesh.{a}={s} must be positive, or -1 to infer it.")
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {unknown}; set the others explicitly.")
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if per_slice % known:
      raise ConfigError(f"mesh: the fixed axes' product {known} does not divide the {per_slice}"
                        f" devices per slice; make mesh.{unknown[0]} explicit.")
    sizes[unknown[0]] = per_slice // known
  if math.prod(sizes.values()) != per_slice:
    where = f" per slice ({n_slices} slices)" if n_slices > 1 else ""
    raise ConfigError(
        f"mesh: {' x '.join(f'{a}={s}' for a, s in sizes.items())} = {math.prod(sizes.values())}"
        f" devices, but there are {per_slice}{where}; set one axis to -1 to infer it.")
  return {a: sizes[a] * dcn[a] for a in MESH_AXES}


def _slice_count(devices) -> int:
  return len({getattr(d, 'slice_index', 0) or 0 for d in devices})


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A Mesh with axes MESH_AXES ('data', 'fsdp', 'sequence', 'expert', 'tensor') in GSPMD
  (Auto) mode.

  `devices`: default all devices; `llmjax.plan` passes a TPU topology's compile-only devices.
  Within a slice the device order follows the physical torus (mesh_utils), so the innermost
  axes get neighbouring chips; across slices `create_hybrid_device_mesh` keeps each mesh
  axis' DCN part outermost.
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = _slice_count(devices)
  sizes = mesh_shape(mesh_cfg, len(devices), slices if slices > 1 else None)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if slices > 1:
    dcn = _sizes(mesh_cfg, 'dcn_')
    ici = tuple(sizes[a] // dcn[a] for a in MESH_AXES)
    array = mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn[a] for a in MESH_AXES), devices,
                                                 allow_split_physical_axes=True)
    return Mesh(array, MESH_AXES, axis_types=axis_types)
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    # Shapes that do not tile the torus: plain order (correct, maybe slower collectives).
    array = np.asarray(devices).reshape(shape)
  return Mesh(array, MESH_AXES, axis_types=axis_types)


def rules_from_config(config) -> tuple:
  """The logical-axis rules named by `config.sharding.rules`."""
  name = config.sharding.rules
  if name not in RULES:
    raise ConfigError(f"sharding.rules='{name}' is unknown; choose one of {list(RULES)}.")
  return RULES[name]


def _mesh_axes_of(logical: str, rules) -> tuple[str, ...]:
  for name, target in rules:
    if name == logical:
      if target is None:
        return ()
      return (target,) if isinstance(target, str) else tuple(target)
  return ()


def check_mesh_fits(config, model_cfg, sizes: dict[str, int]) -> None:
  """Raises ConfigError when the rules split a dimension the mesh does not divide, the batch
  does not split over the data-parallel axes, or a mesh axis would do nothing useful."""
  rules = rules_from_config(config)
  used = {a for _, t in rules if t for a in ((t,) if isinstance(t, str) else t)}
  for axis in MESH_AXES:
    if sizes[axis] > 1 and axis not in used:
      raise ConfigError(f"mesh.{axis}={sizes[axis]} but sharding.rules='{config.sharding.rules}'"
                        f" never uses the {axis} axis (it would only repeat work); set"
                        f" mesh.{axis}=1 or pick rules that use it, e.g. 'fsdp_tensor'.")
  block_axes = {a for name in ('heads', 'kv_heads', 'mlp') for a in _mesh_axes_of(name, rules)}
  if sizes['tensor'] > 1 and 'tensor' not in block_axes:
    # 'fsdp' maps only the vocabulary to tensor: every block would be computed in full on each
    # of the tensor devices (replicated work and weights), which is never what was meant.
    raise ConfigError(f"mesh.tensor={sizes['tensor']} but sharding.rules="
                      f"'{config.sharding.rules}' splits no block (heads, mlp) over tensor, so"
                      " the blocks would be replicated over it; use sharding.rules='fsdp_tensor'"
                      " or mesh.tensor=1.")
  for logical, key in _MODEL_DIMS.items():
    mesh_axes = _mesh_axes_of(logical, rules)
    split = math.prod(sizes[a] for a in mesh_axes)
    dim = int(getattr(model_cfg, key))
    if split > 1 and dim % split:
      names = ' x '.join(f'mesh.{a}={sizes[a]}' for a in mesh_axes)
      divisors = [d for d in range(1, min(dim, 64) + 1) if dim % d == 0]
      raise ConfigError(f"{names} does not divide model.{key}={dim} (sharding.rules="
                        f"'{config.sharding.rules}' splits '{logical}' over it); use a size in"
                        f" {divisors} or other rules.")
  seq_len = int(config.data.seq_len)
  if sizes['sequence'] > 1 and seq_len % sizes['sequence']:
    raise ConfigError(f"mesh.sequence={sizes['sequence']} does not divide data.seq_len={seq_len};"
                      f" use a divisor of {seq_len} or mesh.sequence=1.")
  t = config.train
  data_parallel = math.prod(sizes[a] for a in DATA_AXES)
  if t.batch_size % (data_parallel * t.grad_accum):
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by data x fsdp x expert ="
                      f" {data_parallel} times train.grad_accum={t.grad_accum}; use a multiple"
                      f" of {data_parallel * t.grad_accum}.")


def validate(config, model_cfg, num_devices: int, slices: int | None = None) -> dict[str, int]:
  """Every mesh/sharding check that needs no compilation; returns the mesh axis sizes."""
  sizes = mesh_shape(config.mesh, num_devices, slices)
  check_mesh_fits(config, model_cfg, sizes)
  return sizes


def logical_to_sharding(logical_tree, mesh: Mesh, rules) -> object:
  """A pytree of PartitionSpecs of logical names -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, length] arrays: batch split over every data-parallel axis, length over sequence.

  Each host still reads whole rows (its share of the batch), so mesh.sequence must stay within
  a host's devices, as ICI-heavy axes should anyway.
  """
  return NamedSharding(mesh, P(DATA_AXES, 'sequence'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
