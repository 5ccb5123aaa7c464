"""llmjax.kernels.flash_attention_tpu: numerics in the TPU interpreter, and AOT compilation of
forward + backward for real TPU generations (v5e, v5p, v6e) through libtpu on this CPU host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax.kernels import flash_attention_tpu as fa
from llmjax.models.attention import Mask, reference_attention
from test_kernels_common import CASES, TOPOLOGIES, check, make, tpu_mesh

# Small tiles: more grid steps per call, so the tests cover block skipping and the clamped
# index_maps, and unequal q/k tiles (64 x 128) in the forward.
BLOCKS = fa.BlockSizes(block_q=64, block_k=128, block_q_dq=128, block_k_dq=128,
                       block_q_dkv=64, block_k_dkv=128)


@pytest.mark.parametrize('case', CASES, ids=str)
def test_matches_reference_in_tpu_interpreter(case):
  # interpret=True: the TPU interpreter (pltpu.InterpretParams), which simulates VMEM and DMAs.
  check(case, lambda q, k, v, m: fa.flash_attention(q, k, v, m, block_sizes=BLOCKS,
                                                    interpret=True))


def test_queries_that_see_no_key_give_zeros_and_zero_gradients():
  q, k, v, _, w = make(CASES[0])
  mask = Mask(causal=True, kv_lengths=jnp.array([0, 100]))  # sequence 0 sees nothing
  f = lambda q, k, v: fa.flash_attention(q, k, v, mask, interpret=True)
  out = f(q, k, v)
  dq, dk, dv = jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
  assert not np.any(out[0]) and not np.any(dq[0]) and not np.any(dk[0]) and not np.any(dv[0])
  np.testing.assert_allclose(out[1], reference_attention(q, k, v, mask)[1], atol=1e-5)
  assert np.all(np.isfinite(dq)) and np.any(dq[1])


def test_block_sizes_per_generation():
  assert fa.BlockSizes.for_device('TPU v6 lite').block_k == 1024
  assert fa.BlockSizes.for_device('TPU v5 lite') == fa.BlockSizes()
  assert fa.BlockSizes.for_device('TPU v5').block_k == 1024
  assert fa.BlockSizes.for_device('cpu').block_q == 128


def compile_fwd_bwd(mesh, block_sizes, head_dim, interpret=False):
  """jit(value_and_grad) of the kernel under shard_map over the batch, AOT-compiled."""
  batch, t, heads, kv_heads = 2 * mesh.size, 1024, 8, 2

  def per_device(q, k, v, seg):
    mask = Mask(causal=True, sliding_window=384, q_segment_ids=seg, kv_segment_ids=seg)
    return fa.flash_attention(q, k, v, mask, block_sizes=block_sizes, interpret=interpret)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'),) * 4,
                          out_specs=P('data'))
  loss = lambda q, k, v, seg: jnp.sum(sharded(q, k, v, seg).astype(jnp.float32))
  step = jax.value_and_grad(loss, argnums=(0, 1, 2))
  spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
  args = (spec(batch, t, heads, head_dim), spec(batch, t, kv_heads, head_dim),
          spec(batch, t, kv_heads, head_dim), spec(batch, t, dtype=jnp.int32))
  shard = NamedSharding(mesh, P('data'))
  return jax.jit(step, in_shardings=(shard,) * 4).lower(*args).compile()


@pytest.mark.parametrize('topology', TOPOLOGIES)
def test_compiles_forward_and_backward_for_tpu(topology):
  mesh, kind = tpu_mesh(topology)
  compiled = compile_fwd_bwd(mesh, fa.BlockSizes.for_device(kind), head_dim=128)
  # The forward, dq and dk/dv Mosaic kernels are all in the program.
  assert compiled.as_text().count('tpu_custom_call') >= 3


def test_compiles_head_dim_64_and_picks_mosaic_when_lowering_for_tpu():
  # interpret=None decides at lowering time: lowered for TPU (from this CPU host) it is Mosaic.
  mesh, kind = tpu_mesh('v5e:2x2')
  compiled = compile_fwd_bwd(mesh, fa.BlockSizes.for_device(kind), head_dim=64, interpret=None)
  assert compiled.as_text().count('tpu_custom_call') >= 3
