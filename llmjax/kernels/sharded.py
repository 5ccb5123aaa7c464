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


def _kv_length_axes(q, k, mesh, batch_axes, head_axes) -> tuple[str, ...]:
  """The mesh axes the active rules split the cache's `kv_length` over, when they divide it
  and are not already used for the batch or heads (then the cache is gathered instead)."""
  spec = nn.logical_to_mesh_axes((axes.BATCH, axes.KV_LENGTH, axes.KV_HEADS, axes.HEAD_DIM))
  names = _usable(spec[1], k.shape[1], mesh)
  if set(names) & (set(_axes_tuple(batch_axes)) | set(_axes_tuple(head_axes))):
    return ()
  return names


def shard_decode_attention(fn, q, k, v, mask: Mask, **kwargs):
  """A decode step (one query per row against the cache k, v [batch, max_len, kv_heads, H])
  under the context mesh. `fn` is a decode kernel with `return_lse`.

  When the rules split the cache's `kv_length` (long contexts: `('kv_length', 'sequence')`),
  the cache is never gathered: each device attends to its own slice of cache slots (positions
  first..first+S/n-1, with q_offset and kv_lengths shifted into it) and returns its output and
  log-sum-exp, and the slices are combined exactly (flash-decoding): with m = max_i lse_i,
  out = sum_i exp(lse_i - m) out_i / sum_i exp(lse_i - m). Otherwise: `shard_attention`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return fn(q, k, v, mask, **kwargs)
  b, _, h = specs(q, k, mesh)
  kv_axes = _kv_length_axes(q, k, mesh, b, h)
  if not kv_axes:
    return shard_attention(fn, q, k, v, mask, **kwargs)
  kv = kv_axes if len(kv_axes) > 1 else kv_axes[0]
  per_batch = lambda x: None if x is None else P(b)
  mask_specs = Mask(causal=mask.causal, sliding_window=mask.sliding_window,
                    q_offset=per_batch(mask.q_offset), kv_lengths=per_batch(mask.kv_lengths))
  q_spec, kv_spec = P(b, None, h, None), P(b, kv, h, None)
  n = math.prod(mesh.shape[a] for a in kv_axes)

  def local(q, k, v, mask):
    size = k.shape[1]  # this device's slots: positions first .. first + size - 1
    first = jax.lax.axis_index(kv_axes) * size
    zeros = jnp.zeros((q.shape[0],), jnp.int32)
    q_pos = (zeros if mask.q_offset is None else mask.q_offset.astype(jnp.int32)) - first
    kv_len = (zeros + size * n if mask.kv_lengths is None else mask.kv_lengths.astype(jnp.int32))
    mask = mask.replace(q_offset=q_pos, kv_lengths=jnp.clip(kv_len - first, 0, size))
    out, lse = fn(q, k, v, mask, return_lse=True, **kwargs)  # [B, 1, heads, H], [B, 1, heads]
    m = jax.lax.pmax(lse, kv_axes)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # no visible key anywhere: every weight is 0
    w = jnp.exp(lse - m)  # [B, 1, heads]; 0 for a slice with no visible key
    num = jax.lax.psum(out.astype(jnp.float32) * w[..., None], kv_axes)
    den = jax.lax.psum(w, kv_axes)[..., None]
    return (num / jnp.where(den == 0.0, 1.0, den)).astype(q.dtype)

  # The kernel's index maps mix the device-varying slot offset with invariant values (as
  # with `sequence` in shard_attention), which the varying-axes checker rejects.
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, mask_specs),
                       out_specs=q_spec, check_vma=False)(q, k, v, mask)
