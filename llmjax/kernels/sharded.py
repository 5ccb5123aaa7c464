"""Running an attention kernel under the caller's mesh, with `jax.shard_map`.

XLA cannot partition a Pallas kernel (a Mosaic custom call is opaque to it): under a mesh the
kernel must run per device on its local shard, inside `jax.shard_map`, and AOT compilation for a
TPU topology fails otherwise. Attention is independent across batch and heads, so the shard_map
splits exactly those, as the active flax logical-axis rules split the activations (the layer
constrains q/k/v to (batch, length, heads|kv_heads, head_dim)); length and head_dim stay whole
on each device. The mesh comes from JAX's context (`jax.set_mesh`, as the train loop and plan.py
do) and the rules from flax's (`nn.logical_axis_rules`), so nothing here knows our config.
"""

import math

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from llmjax.models import axes
from llmjax.models.attention import Mask


def _axes_tuple(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _usable(entry, size: int, mesh) -> tuple[str, ...]:
  """Mesh axes of one spec entry, or () when they don't divide `size` evenly."""
  names = _axes_tuple(entry)
  names = tuple(a for a in names if a in mesh.axis_names)
  n = math.prod(mesh.shape[a] for a in names)
  return names if names and size % n == 0 else ()


def specs(q, k, mesh):
  """(batch axes, head axes) for shard_map, from the active logical rules.

  Heads are split only if q heads and kv heads map to the same mesh axes and both divide:
  then local query head h still belongs to local kv head h // group. Otherwise (e.g. 8 query
  heads but 2 kv heads on a 4-way tensor axis) heads stay whole and only batch is split.
  """
  q_spec = nn.logical_to_mesh_axes((axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))
  kv_spec = nn.logical_to_mesh_axes((axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.HEAD_DIM))
  batch_axes = _usable(q_spec[0], q.shape[0], mesh)
  head_axes = _usable(q_spec[2], q.shape[2], mesh)
  if head_axes != _usable(kv_spec[2], k.shape[2], mesh) or set(head_axes) & set(batch_axes):
    head_axes = ()
  return batch_axes or None, head_axes or None


def shard_attention(fn, q, k, v, mask: Mask, **kwargs):
  """Calls `fn(q, k, v, mask, **kwargs)` per device under the context mesh, if there is one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    # No mesh: one device (or plain jit). Already inside a shard_map: the caller split the work.
    return fn(q, k, v, mask, **kwargs)
  b, h = specs(q, k, mesh)
  qkv = P(b, None, h, None)
  per_batch = lambda x: None if x is None else (P(b) if x.ndim == 1 else P(b, None))
  mask_specs = Mask(causal=mask.causal, sliding_window=mask.sliding_window,
                    q_segment_ids=per_batch(mask.q_segment_ids),
                    kv_segment_ids=per_batch(mask.kv_segment_ids),
                    q_offset=per_batch(mask.q_offset), kv_lengths=per_batch(mask.kv_lengths))
  return jax.shard_map(lambda q, k, v, mask: fn(q, k, v, mask, **kwargs), mesh=mesh,
                       in_specs=(qkv, qkv, qkv, mask_specs), out_specs=qkv)(q, k, v, mask)
