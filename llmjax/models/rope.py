"""Rotary position embeddings (Su et al. 2021, RoFormer) with Hugging Face's scaling variants.

The rotation pairs dimension i with i + head_dim/2 ("rotate_half"), the layout of the Hugging
Face Llama/Qwen2/Mistral checkpoints, so their q/k weights load without permutation.
"""

import math

import jax.numpy as jnp
import numpy as np

from llmjax.models.config import ModelConfig


def inv_frequencies(cfg: ModelConfig, seq_len: int | None = None) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] after `cfg.rope_scaling`, as float32 numpy.

  `seq_len` matters only for 'dynamic' (NTK-aware) scaling, which grows the base once the
  sequence exceeds the pretraining context (transformers' `_compute_dynamic_ntk_parameters`).
  """
  dim = cfg.head_dim
  base = cfg.rope_theta
  if cfg.rope_scaling == 'dynamic' and seq_len is not None and seq_len > cfg.rope_original_max_len:
    factor = cfg.rope_scaling_factor
    base = base * ((factor * seq_len / cfg.rope_original_max_len) - (factor - 1)) ** (dim / (dim - 2))
  inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  if cfg.rope_scaling == 'linear':
    inv = inv / cfg.rope_scaling_factor
  elif cfg.rope_scaling == 'llama3':
    # Llama 3.1 (transformers' `_compute_llama3_parameters`): long wavelengths are slowed down by
    # `factor`, short ones kept, and the band in between interpolated smoothly.
    factor, low, high = (cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
                         cfg.rope_high_freq_factor)
    old_len = cfg.rope_original_max_len
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
  """Rotates x [batch, length, heads, head_dim] by its positions [batch, length].

  Angles are computed in float32 (positions up to 128k lose precision in bfloat16); the result
  has x's dtype.
  """
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, length, head_dim/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
