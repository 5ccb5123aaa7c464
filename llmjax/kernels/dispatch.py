"""The attention implementations by `model.attention` name, which kernel runs where, and the
up-front check that the chosen one can run the config.

Every implementation has the entry point's signature `(q, k, v, mask, *, scale=None)`;
`llmjax.models.attention.attention` calls them through `IMPLEMENTATIONS`. Pallas kernels run
under `jax.shard_map` when there is a context mesh (`llmjax.kernels.sharded`).
The kernel layer never imports `llmjax.models` (see `tests/test_layering.py`): `check_config`
and `cache_length` take the model config by its fields.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from llmjax.errors import ConfigError, closest
from llmjax.kernels import decode_attention as decode_lib
from llmjax.kernels import flash_attention_gpu as gpu_lib
from llmjax.kernels import flash_attention_tpu as tpu_lib
from llmjax.kernels.mask import Mask
from llmjax.kernels.reference import reference_attention, xla_attention
from llmjax.kernels.sharded import shard_attention, shard_decode_attention


def pallas_tpu(q, k, v, mask: Mask, *, scale=None):
  """The Mosaic kernels; interpreted when lowered for CPU (tests), compiled for TPU.

  One query token against a cache (the sampler's decode step) goes to the decode kernel, which
  reads the cache in place and batches the GQA group; everything else to flash attention.
  """
  if mask.kv_lengths is not None and decode_lib.supports(q, mask):
    return shard_decode_attention(decode_lib.decode_attention, q, k, v, mask, scale=scale)
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


def cudnn_shape_unsupported(head_dim: int, dtype) -> str | None:
  """Why cuDNN's fused attention can't take this head_dim / compute dtype, or None."""
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"dtype='{jnp.dtype(dtype).name}' (cuDNN flash attention takes bfloat16/float16)"
  if head_dim > 128 or head_dim % 8:
    return f'head_dim={head_dim} (cuDNN needs <= 128 and a multiple of 8)'
  return None


def cudnn_unsupported(q, mask: Mask) -> str | None:
  """Why cuDNN's fused attention (via `jax.nn.dot_product_attention`) can't run this, or None."""
  if (why := cudnn_shape_unsupported(q.shape[-1], q.dtype)) is not None:
    return why
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
                      f"back to the Pallas GPU kernel (or XLA) for it.")
  window = mask.sliding_window
  # XLA partitions cuDNN's custom call itself (custom_partitioning over batch and heads), so
  # unlike the Pallas kernels it needs no shard_map.
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=mask.causal,
      local_window_size=(window - 1, 0) if window else None,  # keys i-window+1 .. i
      key_value_seq_lengths=mask.kv_lengths, implementation='cudnn')


def auto(q, k, v, mask: Mask, *, scale=None):
  """The fastest implementation per platform that can run the call.

  TPU: the Mosaic kernel. GPU: cuDNN where it can express the mask, because its fused flash
  attention (FlashAttention-3 style warp specialisation and TMA on Hopper) is faster than a
  Triton kernel; the Pallas GPU kernel for the rest (segment ids, q_offset, float32). CPU: XLA
  (an interpreted kernel would only be slower). XLA also wherever the platform's kernel cannot
  take the head_dim, so that 'auto' never fails where 'xla' would run.
  """
  backend = jax.default_backend()
  head_dim = q.shape[-1]
  if backend == 'tpu' and tpu_lib.head_dim_unsupported(head_dim) is None:
    return pallas_tpu(q, k, v, mask, scale=scale)
  if backend == 'gpu':
    if cudnn_unsupported(q, mask) is None:
      return cudnn(q, k, v, mask, scale=scale)
    if gpu_lib.head_dim_unsupported(head_dim) is None:
      return pallas_gpu(q, k, v, mask, scale=scale)
  return xla_attention(q, k, v, mask, scale=scale)


AttentionFn = Callable[..., jax.Array]

# Implementations by the name `model.attention` uses.
IMPLEMENTATIONS: dict[str, AttentionFn] = {
    'reference': reference_attention,
    'xla': xla_attention,
    'pallas': pallas,
    'pallas_tpu': pallas_tpu,
    'pallas_gpu': pallas_gpu,
    'cudnn': cudnn,
    'auto': auto,
}

PLATFORMS = ('cpu', 'gpu', 'tpu')
# Where each implementation runs. On CPU the Pallas kernels run in Pallas' interpreter (exact but
# slow: for tests); the TPU kernels compile only for TPU and the Triton kernel only for GPU.
RUNS_ON: dict[str, tuple[str, ...]] = {
    'reference': PLATFORMS,
    'xla': PLATFORMS,
    'pallas': PLATFORMS,
    'pallas_tpu': ('cpu', 'tpu'),
    'pallas_gpu': ('cpu', 'gpu'),
    'cudnn': ('gpu',),
    'auto': PLATFORMS,
}
# jax.Device.platform / backend names that mean one of PLATFORMS.
_PLATFORM_ALIASES = {'cuda': 'gpu', 'rocm': 'gpu'}


def _kernel(implementation: str, platform: str) -> str | None:
  """The fixed kernel `implementation` runs on `platform`: 'pallas_tpu', 'pallas_gpu', 'cudnn',
  or None (plain jnp/XLA, or 'auto', which picks per call and falls back to XLA)."""
  if implementation == 'pallas':
    return 'pallas_gpu' if platform == 'gpu' else 'pallas_tpu'
  return implementation if implementation in ('pallas_tpu', 'pallas_gpu', 'cudnn') else None


def check_config(cfg, platform: str) -> None:
  """Raises a one-line ConfigError if `cfg.attention` cannot run `cfg` on `platform`.

  What the kernels would otherwise raise only when tracing the model (after tokenizer training,
  data loading and initialisation): an unknown name, an implementation for another platform
  ('cudnn' on a CPU), a head_dim or dtype the kernel can't take. Masks that depend on the batch
  (segment ids for 'cudnn') are still checked per call.

  Args:
    cfg: the model config (a `llmjax.models.ModelConfig`; read by its fields attention,
      head_dim and dtype, since this layer does not import the model).
    platform: 'cpu', 'gpu' or 'tpu': where the program will run (`jax.default_backend()`, or
      'tpu' when compiling ahead of time for a TPU topology).
  """
  name = cfg.attention
  platform = _PLATFORM_ALIASES.get(platform, platform)
  if name not in IMPLEMENTATIONS:
    raise ConfigError(f"model.attention='{name}' is unknown.{closest(name, IMPLEMENTATIONS)}"
                      f" Choose one of {list(IMPLEMENTATIONS)}.")
  if platform not in RUNS_ON[name]:
    raise ConfigError(f"model.attention='{name}' does not run on {platform} (only on"
                      f" {'/'.join(RUNS_ON[name])}); use 'auto' (picks per platform) or 'xla'.")
  kernel = _kernel(name, platform)
  why = None
  if kernel == 'pallas_tpu':
    why = tpu_lib.head_dim_unsupported(cfg.head_dim)
  elif kernel == 'pallas_gpu':
    why = gpu_lib.head_dim_unsupported(cfg.head_dim)
  elif kernel == 'cudnn':
    why = cudnn_shape_unsupported(cfg.head_dim, cfg.dtype)
  if why is not None:
    raise ConfigError(f"model.attention='{name}' on {platform} cannot take model.{why}; use"
                      f" 'auto' (falls back to XLA where the kernel can't run) or 'xla'.")


def uses_decode_kernel(cfg, platform: str) -> bool:
  """Whether a decode step (one query against a KV cache) of `cfg` runs the TPU decode kernel."""
  platform = _PLATFORM_ALIASES.get(platform, platform)
  if cfg.attention == 'auto':
    return platform == 'tpu' and tpu_lib.head_dim_unsupported(cfg.head_dim) is None
  return _kernel(cfg.attention, platform) == 'pallas_tpu'


def cache_length(n: int, cfg, platform: str | None = None) -> int:
  """How many slots to allocate for a KV cache that must hold n positions.

  Whole blocks of the decode kernel where it runs (`decode_attention.cache_length`: otherwise it
  pads, i.e. copies, the whole cache every step); n elsewhere, since XLA's attention reads every
  slot and a longer cache would only cost it work.
  Args: cfg: the model config (its attention and head_dim); platform: default the backend's.
  """
  if uses_decode_kernel(cfg, platform or jax.default_backend()):
    return decode_lib.cache_length(n)
  return n
