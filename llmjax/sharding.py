"""Device mesh and the logical-axis -> mesh-axis rules, both from config.

Layers name their dimensions logically (`llmjax.models.axes`); `config.sharding.rules` maps
those names to mesh axes. Nothing outside this module (and the config) knows about the mesh.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llmjax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical -> mesh rules. A logical name maps to a mesh axis (or a tuple of them, or None:
# replicated). Flax takes the first rule whose mesh axes are not already used in that tensor.
DATA_PARALLEL = (
    ('batch', ('data', 'fsdp')),
)
FSDP = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),  # ZeRO-3: every weight is split over fsdp along its model dimension
    ('vocab', 'tensor'),
)
FSDP_TENSOR = (
    ('batch', ('data', 'fsdp')),
    ('heads', 'tensor'),  # Megatron-style: heads and the MLP width split over tensor
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
)
RULES = {'data': DATA_PARALLEL, 'fsdp': FSDP, 'fsdp_tensor': FSDP_TENSOR}


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Axis sizes from config (one may be -1: inferred); checks the product."""
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {unknown}; set the others explicitly.")
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if num_devices % known:
      raise ConfigError(f"mesh: the fixed axes' product {known} does not divide the {num_devices}"
                        f" devices; make mesh.{unknown[0]} explicit.")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(
        f"mesh: {' x '.join(f'{a}={s}' for a, s in sizes.items())} = {math.prod(sizes.values())}"
        f" devices, but there are {num_devices}; set one axis to -1 to infer it.")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A Mesh with axes ('data', 'fsdp', 'tensor') in GSPMD (Auto) mode."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  if devices is jax.devices() or len(devices) == jax.device_count():
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(config) -> tuple:
  """The logical-axis rules named by `config.sharding.rules`."""
  name = config.sharding.rules
  if name not in RULES:
    raise ConfigError(f"sharding.rules='{name}' is unknown; choose one of {list(RULES)}.")
  return RULES[name]


def logical_to_sharding(logical_tree, mesh: Mesh, rules) -> object:
  """A pytree of PartitionSpecs of logical names -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, length] arrays: batch split over every data-parallel axis."""
  return NamedSharding(mesh, P(('data', 'fsdp'), None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
