"""Which kernel runs for `model.attention` = 'pallas', 'pallas_tpu', 'pallas_gpu', 'cudnn', 'auto'.

All have the entry point's signature `(q, k, v, mask, *, scale=None)`; `llmjax.models.attention`
registers them. Pallas kernels run under `jax.shard_map` when there is a context mesh
(`llmjax.kernels.sharded`).
"""

import jax
import jax.numpy as jnp

from llmjax.errors import ConfigError
from llmjax.kernels import decode_attention as decode_lib
from llmjax.kernels import flash_attention_gpu as gpu_lib
from llmjax.kernels import flash_attention_tpu as tpu_lib
from llmjax.kernels.sharded import shard_attention
from llmjax.models.attention import Mask, xla_attention


def pallas_tpu(q, k, v, mask: Mask, *, scale=None):
  """The Mosaic kernels; interpreted when lowered for CPU (tests), compiled for TPU.

  One query token against a cache (the sampler's decode step) goes to the decode kernel, which
  reads the cache in place and batches the GQA group; everything else to flash attention.
  """
  if mask.kv_lengths is not None and decode_lib.supports(q, mask):
    return shard_attention(decode_lib.decode_attention, q, k, v, mask, scale=scale)
  return shard_attention(tpu_lib.flash_attention, q, k, v, mask, scale=scale)


def pallas_gpu(q, k, v, mask: Mask, *, scale=None):
  """The Triton kernel (decode steps included: a 16-row query block costs no more than 1 row on
  a memory-bound step); interpreted on CPU."""
  return shard_attention(gpu_lib.flash_attention, q, k, v, mask, scale=scale)


def pallas(q, k, v, mask: Mask, *, scale=None):
  """The Pallas kernel for the platform: Triton on GPU, Mosaic otherwise.

  Chosen by the default backend, with the TPU kernel on CPU: the TPU kernel itself switches
  between interpreter (CPU) and Mosaic (TPU) when lowering, so AOT-compiling for a TPU topology
  from a CPU host gets the real kernel.
  """
  if jax.default_backend() == 'gpu':
    return pallas_gpu(q, k, v, mask, scale=scale)
  return pallas_tpu(q, k, v, mask, scale=scale)


def cudnn_unsupported(q, mask: Mask) -> str | None:
  """Why cuDNN's fused attention (via `jax.nn.dot_product_attention`) can't run this, or None."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f'{q.dtype} inputs (cuDNN flash attention takes bfloat16/float16)'
  if q.shape[-1] > 128 or q.shape[-1] % 8:
    return f'head_dim={q.shape[-1]} (cuDNN needs <= 128 and a multiple of 8)'
  if mask.q_segment_ids is not None:
    return 'segment ids (packed documents)'
  if mask.q_offset is not None:
    return 'q_offset (queries that start inside the key sequence: decoding with a cache)'
  return None


def cudnn(q, k, v, mask: Mask, *, scale=None):
  """cuDNN's fused flash attention; a one-line ConfigError where it can't run."""
  if jax.default_backend() != 'gpu':
    raise ConfigError(f"model.attention='cudnn' needs an NVIDIA GPU but the backend is "
                      f"'{jax.default_backend()}'; use 'auto' (picks per platform) or 'xla'.")
  if (why := cudnn_unsupported(q, mask)) is not None:
    raise ConfigError(f"model.attention='cudnn' cannot express {why}; use 'auto', which falls "
                      f"back to the Pallas GPU kernel for it.")
  window = mask.sliding_window
  # XLA partitions cuDNN's custom call itself (custom_partitioning over batch and heads), so
  # unlike the Pallas kernels it needs no shard_map.
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=mask.causal,
      local_window_size=(window - 1, 0) if window else None,  # keys i-window+1 .. i
      key_value_seq_lengths=mask.kv_lengths, implementation='cudnn')


def auto(q, k, v, mask: Mask, *, scale=None):
  """The fastest implementation per platform.

  TPU: the Mosaic kernel. GPU: cuDNN where it can express the mask, because its fused flash
  attention (FlashAttention-3 style warp specialisation and TMA on Hopper) is faster than a
  Triton kernel; the Pallas GPU kernel for the rest (segment ids, q_offset, float32). CPU: XLA
  (an interpreted kernel would only be slower).
  """
  backend = jax.default_backend()
  if backend == 'tpu':
    return pallas_tpu(q, k, v, mask, scale=scale)
  if backend == 'gpu':
    if cudnn_unsupported(q, mask) is None:
      return cudnn(q, k, v, mask, scale=scale)
    return pallas_gpu(q, k, v, mask, scale=scale)
  return xla_attention(q, k, v, mask, scale=scale)
