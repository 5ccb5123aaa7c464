"""Small helpers the Pallas kernels share: output shapes under shard_map, interpret mode."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """An output shape varying over the same manual mesh axes as `like`: `jax.shard_map` with
  check_vma=True (the default) requires this of every pallas_call output."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def interpret_arg(interpret):
  """Our `interpret` (False / True / InterpretParams) -> pallas_call's for a TPU kernel."""
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret or False


def platform_call(fn, interpret, *args, gpu: bool = False):
  """Runs `fn(interpret, *args)`. interpret=None: interpreted on CPU, compiled elsewhere.

  The choice is made when lowering (`lax.platform_dependent` lowers only the matching branch),
  not from `jax.default_backend()`, so that AOT-compiling for a TPU topology from a CPU host
  (plan.py) gets the real Mosaic kernel while the same code runs interpreted in CPU tests.
  gpu=True: a Triton kernel, whose interpret=True is the generic interpreter.
  The CPU branch uses Pallas' generic interpreter (`interpret=True`), not the TPU interpreter:
  the latter runs on ordered io_callbacks, whose effect tokens the compiled TPU branch of the
  `platform_dependent` cond does not produce, so the pair fails to lower for TPU.
  """
  if interpret is not None:
    return fn(bool(interpret) if gpu else interpret_arg(interpret), *args)
  return lax.platform_dependent(*args, cpu=functools.partial(fn, True),
                                default=functools.partial(fn, False))


# Visibility of a (query block, key block) pair under `Mask`, shared by the kernels (to skip
# work) and the TPU index_maps (to skip DMAs). All indices are absolute key positions; query
# row i of sequence b sits at q_offset[b] + i. Segment ids are not known per block: they only
# mask inside one.


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  causal: bool
  window: int  # 0 = none
  segments: bool


def block_visible(spec, q_first, q_last, k_first, k_last, kv_len):
  """Whether any (query, key) of the block pair may be visible (segments aside)."""
  visible = k_first < kv_len
  if spec.causal:
    visible = jnp.logical_and(visible, k_first <= q_last)
  if spec.window:
    visible = jnp.logical_and(visible, q_first - k_last < spec.window)
  return visible


def kv_block_range(spec, q_first, q_last, kv_len, block_k, num_kv_blocks):
  """[lo, hi] of the key blocks a query block can see (hi >= lo, clamped into the grid)."""
  lo = jnp.int32(0)
  if spec.window:
    lo = jnp.maximum(0, (q_first - spec.window + 1) // block_k)
  hi = jnp.minimum(num_kv_blocks - 1, (kv_len - 1) // block_k)
  if spec.causal:
    hi = jnp.minimum(hi, q_last // block_k)
  lo = jnp.minimum(lo, num_kv_blocks - 1)
  return lo, jnp.maximum(lo, hi)


def q_block_range(spec, k_first, k_last, q_offset, block_q, num_q_blocks):
  """[lo, hi] of the query blocks that can see a key block (hi >= lo, clamped into the grid)."""
  lo = jnp.int32(0)
  if spec.causal:  # some row i of the block has q_offset + i >= k_first
    lo = jnp.maximum(0, (k_first - q_offset) // block_q)
  hi = jnp.int32(num_q_blocks - 1)
  if spec.window:  # some row has q_offset + i - k_last < window
    hi = jnp.minimum(hi, (spec.window + k_last - q_offset - 1) // block_q)
  lo = jnp.minimum(lo, num_q_blocks - 1)
  return lo, jnp.maximum(lo, hi)
