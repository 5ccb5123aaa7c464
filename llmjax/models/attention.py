"""The one attention entry point and the attention layer.

Every implementation (plain-jnp reference, XLA, Pallas kernels, cuDNN) takes the same
arguments: q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim] and a
`Mask` that *describes* the mask instead of materialising it, so that kernels can skip fully
masked blocks. `attention(...)` picks the implementation by its registry name.

`Mask`, the references and the registry live in the kernel layer (`llmjax.kernels.mask`,
`.reference`, `.dispatch`), which never imports the model; they are re-exported here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llmjax.errors import ConfigError, closest
from llmjax.kernels.dispatch import IMPLEMENTATIONS, AttentionFn  # noqa: F401 (re-exported)
from llmjax.kernels.mask import Mask
from llmjax.kernels.reference import reference_attention, xla_attention  # noqa: F401
from llmjax.models import adapters, axes
from llmjax.models.config import ModelConfig
from llmjax.models.layers import DenseGeneral
from llmjax.models.rope import apply_rope, inv_frequencies


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
  def __call__(self, x, positions, mask: Mask, kv_cache=None, write_index=None,
               deterministic: bool = True):
    cfg = self.cfg
    # Each projection's adapter is chosen here by its target name (model.lora_targets).
    dense = lambda features, axes_, name, bias: DenseGeneral(
        features=features, kernel_axes=axes_, use_bias=bias, cfg=cfg,
        adapter=adapters.for_target(cfg, name), name=name)
    # [batch, length, heads, head_dim]
    q = dense((cfg.num_heads, cfg.head_dim), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), 'q',
              cfg.qkv_bias)(x, deterministic)
    k = dense((cfg.num_kv_heads, cfg.head_dim), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), 'k',
              cfg.qkv_bias)(x, deterministic)
    v = dense((cfg.num_kv_heads, cfg.head_dim), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), 'v',
              cfg.qkv_bias)(x, deterministic)
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
                       kernel_axes=(axes.HEADS, axes.HEAD_DIM, axes.EMBED),
                       adapter=adapters.for_target(cfg, 'o'), name='o',
                       out_proj=True)(out, deterministic)
    return out, kv_cache
