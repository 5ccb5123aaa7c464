"""The one attention entry point, its mask description, and the attention layer.

Every implementation (plain-jnp reference, XLA, Pallas kernels, cuDNN) takes the same
arguments: q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim] and a
`Mask` that *describes* the mask instead of materialising it, so that kernels can skip fully
masked blocks. `attention(...)` picks the implementation by its registry name.
"""

from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llmjax.errors import ConfigError, closest
from llmjax.models import axes
from llmjax.models.config import ModelConfig
from llmjax.models.layers import DenseGeneral
from llmjax.models.rope import apply_rope, inv_frequencies


@flax.struct.dataclass
class Mask:
  """Which keys each query may see.

  Query i of sequence b sits at index `q_offset[b] + i` of the key sequence (0 when absent; the
  cache length when decoding). Key j is visible to query i iff all present conditions hold:
    causal:          j <= q_index
    sliding_window:  q_index - j < sliding_window          (0 = no window)
    segment ids:     q_segment_ids[b, i] == kv_segment_ids[b, j]  (packed documents)
    kv_lengths:      j < kv_lengths[b]                     (padding / unfilled cache)
  A query that sees no key at all (padding) gets a zero output.
  """
  causal: bool = flax.struct.field(pytree_node=False, default=True)
  sliding_window: int = flax.struct.field(pytree_node=False, default=0)
  q_segment_ids: jax.Array | None = None  # [batch, q_len] int
  kv_segment_ids: jax.Array | None = None  # [batch, kv_len] int
  q_offset: jax.Array | None = None  # [batch] int
  kv_lengths: jax.Array | None = None  # [batch] int

  def dense(self, q_len: int, kv_len: int) -> jax.Array:
    """The boolean mask [batch or 1, q_len, kv_len] this description stands for."""
    q_idx = jnp.arange(q_len)[None, :, None]  # [1, q_len, 1]
    if self.q_offset is not None:
      q_idx = q_idx + self.q_offset[:, None, None]
    kv_idx = jnp.arange(kv_len)[None, None, :]  # [1, 1, kv_len]
    mask = jnp.ones((1, q_len, kv_len), bool)
    if self.causal:
      mask = mask & (kv_idx <= q_idx)
    if self.sliding_window:
      mask = mask & (q_idx - kv_idx < self.sliding_window)
    if self.q_segment_ids is not None:
      mask = mask & (self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :])
    if self.kv_lengths is not None:
      mask = mask & (kv_idx < self.kv_lengths[:, None, None])
    return mask


def reference_attention(q, k, v, mask: Mask, *, scale: float | None = None) -> jax.Array:
  """Plain-jnp attention, the oracle for every other implementation.

  Repeats K/V to all query heads and computes everything in float32.
  Args: q [B, T, N, H], k/v [B, S, K, H]. Returns [B, T, N, H] in q's dtype.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  groups = q.shape[2] // k.shape[2]
  k32 = jnp.repeat(k.astype(jnp.float32), groups, axis=2)  # [B, S, N, H]
  v32 = jnp.repeat(v.astype(jnp.float32), groups, axis=2)
  logits = jnp.einsum('btnh,bsnh->bnts', q.astype(jnp.float32), k32) * scale
  m = mask.dense(q.shape[1], k.shape[1])[:, None]  # [B, 1, T, S]
  logits = jnp.where(m, logits, -jnp.inf)
  probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  probs = jnp.where(m, probs, 0.0)
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  probs = probs / jnp.where(denom == 0, 1.0, denom)
  return jnp.einsum('bnts,bsnh->btnh', probs, v32).astype(q.dtype)


def xla_attention(q, k, v, mask: Mask, *, scale: float | None = None) -> jax.Array:
  """Einsum attention for XLA: GQA by grouping query heads (K/V are never repeated in memory),
  matmuls in the input dtype with float32 accumulation, softmax in float32.
  Args: q [B, T, N, H], k/v [B, S, K, H]. Returns [B, T, N, H].
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  scale = h ** -0.5 if scale is None else scale
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
  logits = jnp.einsum('btkgh,bskh->bkgts', q, k, preferred_element_type=jnp.float32) * scale
  m = mask.dense(t, k.shape[1])[:, None, None]  # [B, 1, 1, T, S]
  # A large finite negative instead of -inf keeps fully masked rows finite in the backward pass.
  logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(m, probs, 0.0).astype(v.dtype)  # fully masked rows -> zero output
  out = jnp.einsum('bkgts,bskh->btkgh', probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


AttentionFn = Callable[..., jax.Array]


# The kernels live in `llmjax.kernels` (see `llmjax/kernels/dispatch.py` for which one runs
# where). They import `Mask` from this module, so they are imported on first call, not here.
def pallas_attention(q, k, v, mask: Mask, *, scale: float | None = None) -> jax.Array:
  """Pallas flash attention for the platform (Mosaic on TPU, Triton on GPU, interpreted on CPU);
  a decode step (one query against a cache) runs the decode kernel on TPU."""
  from llmjax.kernels import dispatch
  return dispatch.pallas(q, k, v, mask, scale=scale)


def pallas_tpu_attention(q, k, v, mask: Mask, *, scale: float | None = None) -> jax.Array:
  """The Mosaic (TPU) kernels, also on CPU (interpreted) and when AOT-compiling for TPU."""
  from llmjax.kernels import dispatch
  return dispatch.pallas_tpu(q, k, v, mask, scale=scale)


def pallas_gpu_attention(q, k, v, mask: Mask, *, scale: float | None = None) -> jax.Array:
  """The Triton (GPU) kernel; interpreted on CPU."""
  from llmjax.kernels import dispatch
  return dispatch.pallas_gpu(q, k, v, mask, scale=scale)


def cudnn_attention(q, k, v, mask: Mask, *, scale: float | None = None) -> jax.Array:
  """cuDNN fused attention; GPU only, and a ConfigError for masks it can't express."""
  from llmjax.kernels import dispatch
  return dispatch.cudnn(q, k, v, mask, scale=scale)


def auto_attention(q, k, v, mask: Mask, *, scale: float | None = None) -> jax.Array:
  """TPU: the Pallas kernel; GPU: cuDNN, or the Pallas kernel where cuDNN can't; CPU: XLA."""
  from llmjax.kernels import dispatch
  return dispatch.auto(q, k, v, mask, scale=scale)


# Implementations by the name `model.attention` uses. Kernels register themselves here.
IMPLEMENTATIONS: dict[str, AttentionFn] = {
    'reference': reference_attention,
    'xla': xla_attention,
    'pallas': pallas_attention,
    'pallas_tpu': pallas_tpu_attention,
    'pallas_gpu': pallas_gpu_attention,
    'cudnn': cudnn_attention,
    'auto': auto_attention,
}


def attention(q, k, v, mask: Mask, *, implementation: str = 'xla',
              scale: float | None = None) -> jax.Array:
  """The attention entry point.

  Args:
    q: [batch, q_len, heads, head_dim]
    k, v: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0.
    mask: what each query may see.
    implementation: a key of IMPLEMENTATIONS.
  Returns: [batch, q_len, heads, head_dim] in q's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ConfigError(f"model.attention='{implementation}' is unknown.{closest(implementation, IMPLEMENTATIONS)}"
                      f" Choose one of {list(IMPLEMENTATIONS)}.")
  return IMPLEMENTATIONS[implementation](q, k, v, mask, scale=scale)


class Attention(nn.Module):
  """Multi-head attention with GQA/MQA, optional qkv bias, RoPE and a KV cache.

  The cache is an explicit value, (k, v) each [batch, max_len, kv_heads, head_dim], passed in
  and returned; `write_index` [batch] says where this call's keys go.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask: Mask, kv_cache=None, write_index=None):
    cfg = self.cfg
    dense = lambda features, axes_, name, bias: DenseGeneral(
        features=features, kernel_axes=axes_, use_bias=bias, cfg=cfg, name=name)
    # [batch, length, heads, head_dim]
    q = dense((cfg.num_heads, cfg.head_dim), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), 'q',
              cfg.qkv_bias)(x)
    k = dense((cfg.num_kv_heads, cfg.head_dim), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), 'k',
              cfg.qkv_bias)(x)
    v = dense((cfg.num_kv_heads, cfg.head_dim), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), 'v',
              cfg.qkv_bias)(x)
    if cfg.position == 'rope':
      # Dynamic scaling sizes the base by the sequence so far, as transformers does per call.
      inv_freq = inv_frequencies(cfg, seq_len=jnp.max(positions, axis=-1) + 1)  # [batch] lengths
      q = apply_rope(q, positions, inv_freq)
      k = apply_rope(k, positions, inv_freq)
    q = nn.with_logical_constraint(q, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))
    k = nn.with_logical_constraint(k, (axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.HEAD_DIM))
    v = nn.with_logical_constraint(v, (axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.HEAD_DIM))
    q = checkpoint_name(q, 'query_proj')
    k = checkpoint_name(k, 'key_proj')
    v = checkpoint_name(v, 'value_proj')

    if kv_cache is not None:
      cache_k, cache_v = kv_cache
      write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice_in_dim(c, new, i, axis=0))
      cache_k = write(cache_k, k.astype(cache_k.dtype), write_index)
      cache_v = write(cache_v, v.astype(cache_v.dtype), write_index)
      k, v, kv_cache = cache_k, cache_v, (cache_k, cache_v)

    out = attention(q, k, v, mask, implementation=cfg.attention)  # [batch, length, heads, head_dim]
    out = DenseGeneral(features=cfg.embed_dim, axis=(-2, -1), use_bias=cfg.out_bias, cfg=cfg,
                       kernel_axes=(axes.HEADS, axes.HEAD_DIM, axes.EMBED), name='o',
                       out_proj=True)(out)
    return out, kv_cache
