"""llmjax.kernels.flash_attention_gpu: the Triton kernel's numerics in Pallas' interpreter
(forward and dq/dk/dv against the reference over the shared factorised grid)."""

import pytest

from llmjax.kernels import flash_attention_gpu as fa
from test_kernels_common import CASES, check

# Small tiles (16-64, powers of two as Triton needs): several loop iterations per program and
# unequal q/k tiles, so loop bounds from the mask and the padding are exercised.
BLOCKS = fa.BlockSizes(block_q=32, block_k=64, block_q_dq=64, block_k_dq=32, block_q_dkv=32,
                       block_k_dkv=64)


@pytest.mark.parametrize('case', CASES, ids=str)
def test_matches_reference_in_interpreter(case):
  check(case, lambda q, k, v, m: fa.flash_attention(q, k, v, m, block_sizes=BLOCKS,
                                                    interpret=True))


def test_head_dim_must_be_a_power_of_two():
  import jax.numpy as jnp
  from llmjax.models.attention import Mask
  q = jnp.zeros((1, 16, 2, 80))
  with pytest.raises(ValueError, match='power of two'):
    fa.flash_attention(q, q, q, Mask(), interpret=True)
