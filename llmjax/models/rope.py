"""Rotary position embeddings (Su et al. 2021, RoFormer) with Hugging Face's scaling variants.

The rotation pairs dimension i with i + head_dim/2 ("rotate_half"), the layout of the Hugging
Face Llama/Qwen2/Mistral checkpoints, so their q/k weights load without permutation.
"""

import math

import jax.numpy as jnp
import numpy as np

from llmjax.models.config import ModelConfig


def inv_frequencies(cfg: ModelConfig, seq_len=None):
  """Inverse frequencies [head_dim // 2] after `cfg.rope_scaling`, as float32 numpy; for
  'dynamic' scaling with `seq_len` given, float32 [*seq_len.shape, head_dim // 2].

  `seq_len` (an int or an int array, e.g. [batch]: each sequence's largest position + 1)
  matters only for 'dynamic' (NTK-aware) scaling, which grows the base once the sequence
  exceeds the pretraining context `rope_original_max_len` (transformers'
  `_compute_dynamic_ntk_parameters`, in float32 as there).
  """
  dim = cfg.head_dim
  base = cfg.rope_theta
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
  inv = 1.0 / (base ** exponents)
  if cfg.rope_scaling == 'dynamic' and seq_len is not None:
    factor, old_len = cfg.rope_scaling_factor, cfg.rope_original_max_len
    seq = jnp.asarray(seq_len).astype(jnp.float32)[..., None]  # [..., 1]
    grown = base * ((factor * seq / old_len) - (factor - 1)) ** (dim / (dim - 2))
    # Up to the pretraining context the frequencies are exactly the unscaled ones.
    return jnp.where(seq > old_len, 1.0 / (grown ** exponents), inv).astype(jnp.float32)
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

  inv_freq: [head_dim/2], or [batch, head_dim/2] (dynamic scaling: each sequence its own).
  Angles are computed in float32 (positions up to 128k lose precision in bfloat16); the result
  has x's dtype.
  """
  if inv_freq.ndim == 2:
    inv_freq = inv_freq[:, None, :]  # [batch, 1, head_dim/2]
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, length, head_dim/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
