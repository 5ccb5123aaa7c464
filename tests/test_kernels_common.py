"""Shared cases and tolerances for the attention kernel tests (no tests of its own).

The grid is factorised, not a product: each case varies several axes at once (dtype, lengths
that are / are not multiples of the block, head_dim 64/128, GQA ratio 1/2/4/8, mask kind), so
that every value of every axis appears and the suite stays fast in interpret mode.

Oracles and tolerances:
  float32: the plain-jnp `reference_attention` (float32 everywhere); forward within 1e-5 and
    gradients within 1e-4 (max abs error).
  bfloat16: "truth" is the float32 reference on the same bf16-valued inputs; the kernel's error
    is bounded by c times the error of a standard bf16 implementation (`xla_attention` in bf16:
    bf16 matmul inputs, float32 softmax, probabilities cast to bf16 before P @ V) plus a small
    atol. A flash kernel rounds the same things (q, k, v, the unnormalised probabilities and the
    output to bf16), so its error is of the same order; comparing with 0 tolerance would demand
    more than bf16 can hold, and a fixed atol would not scale with the inputs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh

from llmjax.models.attention import Mask, reference_attention, xla_attention

# TPU topology names libtpu knows for AOT compilation on this CPU host (v5p is a 3-D torus, so
# it needs three dimensions; 'v5p:2x2' is rejected).
TOPOLOGIES = ['v5e:2x2', 'v5p:2x2x1', 'v6e:2x2']

BF16_FACTOR = 2.0  # c: kernel error <= c * (bf16 XLA error) + BF16_ATOL
BF16_ATOL = 2e-3


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  dtype: str = 'float32'
  t: int = 256  # q_len
  s: int | None = None  # kv_len (default t)
  head_dim: int = 64
  heads: int = 4
  kv_heads: int = 4
  causal: bool = True
  window: int = 0
  segments: bool = False
  offsets: bool = False  # q_offset + kv_lengths (chunked prefill against a cache)
  batch: int = 2

  def __str__(self):
    return self.name


# The mask branches (causal, window, segments, offsets/kv_lengths) are independent `if`s in
# the kernels, so no case needs all combinations. Where each axis value is covered: f32 strict
# tolerance: mha/causal/d64 and t = 2 blocks ('f32-causal-mha-d64'), window + d128 + GQA 2
# ('f32-window-gqa2-d128-t200'), no causal mask + segments + GQA 4 + a ragged tail
# ('f32-segments-gqa4-t130'), offsets + kv_lengths + MQA + s != t ('f32-offsets-mqa-t100-s300');
# bf16: causal + d128 + GQA 4, and causal + window + segments + GQA 8. (Cases dropped as
# covered: 'f32-causal-segments-gqa8' = causal + segments + GQA 8, all in the last case;
# 'f32-full-gqa2-t129' = no causal mask + GQA 2 + a tail past one block, in the t130 and t200
# cases.) The batch is a grid axis like any other: batch=1 wherever nothing is per row; the
# per-row index maps (q_offset, kv_lengths, segment ids) are checked by the batch-2 cases
# 'f32-causal-mha-d64', 'f32-segments-gqa4-t130' and 'f32-offsets-mqa-t100-s300'.
CASES = [
    Case('f32-causal-mha-d64'),
    Case('f32-window-gqa2-d128-t200', t=200, head_dim=128, heads=4, kv_heads=2, window=64,
         batch=1),
    Case('f32-segments-gqa4-t130', t=130, heads=8, kv_heads=2, causal=False, segments=True),
    Case('f32-offsets-mqa-t100-s300', t=100, s=300, heads=2, kv_heads=1, offsets=True),
    Case('bf16-causal-gqa4-d128', dtype='bfloat16', head_dim=128, heads=4, kv_heads=1, batch=1),
    Case('bf16-window-segments-gqa8-t200', dtype='bfloat16', t=200, heads=8, kv_heads=1,
         window=48, segments=True, batch=1),
]

# Not in the kernel grid (see above), but the dispatch test's packed GQA case.
CAUSAL_SEGMENTS_GQA8 = Case('f32-causal-segments-gqa8', heads=8, kv_heads=1, segments=True)


def make(case: Case, seed: int = 0):
  """(q, k, v, mask, cotangent) for a case; q/k/v in the case's dtype."""
  s = case.s or case.t
  kq, kk, kv, kw, kseg = jax.random.split(jax.random.PRNGKey(seed), 5)
  dtype = jnp.dtype(case.dtype)
  q = jax.random.normal(kq, (case.batch, case.t, case.heads, case.head_dim)).astype(dtype)
  k = jax.random.normal(kk, (case.batch, s, case.kv_heads, case.head_dim)).astype(dtype)
  v = jax.random.normal(kv, (case.batch, s, case.kv_heads, case.head_dim)).astype(dtype)
  w = jax.random.normal(kw, q.shape, jnp.float32)
  mask = Mask(causal=case.causal, sliding_window=case.window)
  if case.segments:
    # Packed documents of random lengths, then padding (id 0) at the end.
    bounds = np.sort(np.asarray(jax.random.randint(kseg, (case.batch, 3), 1, case.t)), axis=1)
    ids = 1 + (np.arange(case.t)[None, :, None] >= bounds[:, None, :]).sum(-1)
    ids[:, case.t - case.t // 10:] = 0
    ids = jnp.asarray(ids, jnp.int32)
    mask = dataclasses.replace(mask, q_segment_ids=ids, kv_segment_ids=ids)
  if case.offsets:
    # Sequence 0: the last t of s cache slots; sequence 1: t queries after 50 cached ones.
    q_offset = jnp.array([s - case.t, 50][:case.batch], jnp.int32)
    mask = dataclasses.replace(mask, q_offset=q_offset, kv_lengths=q_offset + case.t)
  return q, k, v, mask, w


def loss_fn(attn, mask, w):
  return lambda q, k, v: jnp.sum(attn(q, k, v, mask).astype(jnp.float32) * w)


def max_err(a, b) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def check(case: Case, kernel):
  """Checks forward and dq/dk/dv of `kernel(q, k, v, mask)` against the oracles; returns the
  errors for the report."""
  q, k, v, mask, w = make(case)
  out = jax.jit(lambda q, k, v: kernel(q, k, v, mask))(q, k, v)
  grads = jax.jit(jax.grad(loss_fn(kernel, mask, w), argnums=(0, 1, 2)))(q, k, v)
  f32 = lambda x: x.astype(jnp.float32)
  ref_out = reference_attention(f32(q), f32(k), f32(v), mask)
  ref_grads = jax.grad(loss_fn(reference_attention, mask, w), argnums=(0, 1, 2))(
      f32(q), f32(k), f32(v))
  assert out.dtype == q.dtype and out.shape == q.shape
  errs = {'out': max_err(out, ref_out)}
  errs.update({n: max_err(g, r) for n, g, r in zip(('dq', 'dk', 'dv'), grads, ref_grads)})
  for g, x in zip(grads, (q, k, v)):
    assert g.dtype == x.dtype and g.shape == x.shape
  if case.dtype == 'float32':
    assert errs['out'] <= 1e-5, errs
    assert max(errs['dq'], errs['dk'], errs['dv']) <= 1e-4, errs
  else:
    base_out = xla_attention(q, k, v, mask)
    base_grads = jax.grad(loss_fn(xla_attention, mask, w), argnums=(0, 1, 2))(
        q, k, v)
    base = {'out': max_err(base_out, ref_out)}
    base.update({n: max_err(g, r) for n, g, r in zip(('dq', 'dk', 'dv'), base_grads, ref_grads)})
    for n in errs:
      assert errs[n] <= BF16_FACTOR * base[n] + BF16_ATOL, (n, errs, base)
  return errs


def tpu_mesh(name):
  """A 1-D 'data' mesh over a TPU topology's devices (AOT only), and their device_kind."""
  topo = topologies.get_topology_desc(platform='tpu', topology_name=name)
  return Mesh(np.array(topo.devices).reshape(-1), ('data',)), topo.devices[0].device_kind
