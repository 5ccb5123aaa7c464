"""Running an attention kernel under the caller's mesh, with `jax.shard_map`.

XLA cannot partition a Pallas kernel (a Mosaic custom call is opaque to it): under a mesh the
kernel must run per device on its local shard, inside `jax.shard_map`, and AOT compilation for a
TPU topology fails otherwise. Attention is independent across batch and heads, so the shard_map
splits exactly those, as the active flax logical-axis rules split the activations (the layer
constrains q/k/v to (batch, length, heads|kv_heads, head_dim)); head_dim stays whole.

Context parallelism (rules mapping `length` to the `sequence` mesh axis): each device keeps its
slice of the queries, gets every key and value (shard_map's in_specs make JAX all-gather them;
with GQA they are the small tensors) and passes its slice's first position as `q_offset`, so
causal and window masks, block skipping and segment ids stay exact. The mesh comes from JAX's
context (`jax.set_mesh`, as the train loop and plan.py do) and the rules from flax's
(`nn.logical_axis_rules`), so nothing here knows our config.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llmjax import axes
from llmjax.kernels.mask import Mask


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
  """(batch axes, length axes, head axes) for shard_map, from the active logical rules.

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
  length_axes = _usable(q_spec[1], q.shape[1], mesh)
  if set(length_axes) & (set(batch_axes) | set(head_axes)):
    length_axes = ()
  return batch_axes or None, length_axes or None, head_axes or None


def shard_attention(fn, q, k, v, mask: Mask, **kwargs):
  """Calls `fn(q, k, v, mask, **kwargs)` per device under the context mesh, if there is one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    # No mesh: one device (or plain jit). Already inside a shard_map: the caller split the work.
    return fn(q, k, v, mask, **kwargs)
  b, s, h = specs(q, k, mesh)
  q_spec, kv_spec = P(b, s, h, None), P(b, None, h, None)
  per_batch = lambda x: None if x is None else (P(b) if x.ndim == 1 else P(b, None))
  mask_specs = Mask(causal=mask.causal, sliding_window=mask.sliding_window,
                    q_segment_ids=None if mask.q_segment_ids is None else P(b, s),
                    kv_segment_ids=per_batch(mask.kv_segment_ids),
                    q_offset=per_batch(mask.q_offset), kv_lengths=per_batch(mask.kv_lengths))

  def local(q, k, v, mask):
    if s is not None:  # this device's queries start at its slice's first position
      first = jax.lax.axis_index(s) * q.shape[1]
      offset = jnp.full((q.shape[0],), first, jnp.int32)
      mask = mask.replace(q_offset=offset if mask.q_offset is None else mask.q_offset + offset)
    return fn(q, k, v, mask, **kwargs)

  # With `sequence` split, the kernels' index maps mix the device-varying q_offset with
  # invariant values, which the varying-axes checker rejects; unchecked, shard_map's transpose
  # sums K/V's cotangents over `sequence` (each device's queries contribute part of dK, dV).
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, mask_specs),
                       out_specs=q_spec, check_vma=s is None)(q, k, v, mask)
