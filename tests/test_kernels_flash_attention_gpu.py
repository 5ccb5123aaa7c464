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


# On an NVIDIA GPU (skipped elsewhere): the same cases with the kernels compiled, not
# interpreted: the Triton kernel through Pallas, and cuDNN's fused attention (what
# model.attention='auto' picks on a GPU) where it can express the case's mask.
import jax  # noqa: E402

from llmjax.kernels import dispatch  # noqa: E402
from test_kernels_common import make  # noqa: E402

needs_gpu = pytest.mark.skipif(jax.default_backend() != 'gpu',
                               reason='needs an NVIDIA GPU (the compiled kernels)')


@needs_gpu
@pytest.mark.parametrize('case', CASES, ids=str)
def test_matches_reference_compiled_on_a_gpu(case):
  # 'highest': the float32 tolerances are for float32 dots, not the TF32 a GPU uses by default
  # (in the kernel's dots and in the reference's).
  with jax.default_matmul_precision('highest'):
    check(case, lambda q, k, v, m: fa.flash_attention(q, k, v, m, block_sizes=BLOCKS))


@needs_gpu
@pytest.mark.parametrize('case', [c for c in CASES if c.dtype == 'bfloat16'], ids=str)
def test_cudnn_matches_reference_on_a_gpu(case):
  q, _, _, mask, _ = make(case)
  if (why := dispatch.cudnn_unsupported(q, mask)) is not None:
    pytest.skip(f'cuDNN cannot express it: {why}')
  check(case, dispatch.cudnn)
