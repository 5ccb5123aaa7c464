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
from llmjax.models.layers import DenseGeneral, RMSNorm
from llmjax.models.rope import apply_rope, inv_frequencies

# One layer's KV cache [batch, max_len, kv_heads, head_dim].
CACHE_LAYER_AXES = (axes.BATCH, axes.KV_LENGTH, axes.KV_HEADS, axes.HEAD_DIM)


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


def attention_with_prefix(q, k, v, mask: Mask, prefix_k, prefix_v, positions=None) -> jax.Array:
  """Attention over V prefix keys (virtual tokens) followed by the sequence's keys.

  q [B, T, N, H]; k, v [B, S, K, H] under `mask`; prefix_k, prefix_v [B or 1, V, K, H], visible
  to every query whatever the mask says (so to every packed document of a row: `Mask` cannot
  express a key that matches all segments, hence this dense einsum path instead of the
  registry's kernels; V is small), but for a sliding window: prefix key j sits at position j
  and query i at positions[b, i] [B, T] (the real tokens' positions start at V), so with
  mask.sliding_window W it is seen while positions - j < W, as PEFT's virtual tokens are.
  One softmax over V + S keys, float32, as `xla_attention`.
  Returns [B, T, N, H] in q's dtype.
  """
  b, t, n, h = q.shape
  kv_heads, num_virtual = k.shape[2], prefix_k.shape[1]
  prefix_k = jnp.broadcast_to(prefix_k, (b,) + prefix_k.shape[1:]).astype(k.dtype)
  prefix_v = jnp.broadcast_to(prefix_v, (b,) + prefix_v.shape[1:]).astype(v.dtype)
  keys = jnp.concatenate([prefix_k, k], axis=1)  # [B, V + S, K, H]
  values = jnp.concatenate([prefix_v, v], axis=1)
  m = mask.dense(t, k.shape[1])  # [B or 1, T, S]
  m = jnp.broadcast_to(m, (b,) + m.shape[1:])
  seen = jnp.ones((b, t, num_virtual), bool)
  if mask.sliding_window:
    seen = positions[:, :, None] - jnp.arange(num_virtual)[None, None] < mask.sliding_window
    seen = jnp.broadcast_to(seen, (b, t, num_virtual))
  m = jnp.concatenate([seen, m], axis=-1)[:, None, None]  # [B, 1, 1, T, V + S]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
  logits = jnp.einsum('btkgh,bskh->bkgts', q, keys, preferred_element_type=jnp.float32) * h**-0.5
  logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)  # every row sees the prefix
  out = jnp.einsum('bkgts,bskh->btkgh', probs, values, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


class Attention(nn.Module):
  """Multi-head attention with GQA/MQA, optional qkv bias, RoPE and a KV cache.

  The cache is an explicit value passed in and returned: all layers', (k, v) each
  [layers, batch, max_len, kv_heads, head_dim], of which this is layer `layer` (an int or a
  traced int32); `write_index` [batch] says where this call's keys go. The batch is the
  cache's first `batch` rows; attention reads their first `kv_span` slots (None: all).
  `prefix` (k, v) [1, V, kv_heads, head_dim] each, or None: virtual-token keys every query
  attends to before its own (prompt tuning's, computed by `Transformer`); with
  cfg.virtual_tokens='prefix' they are this layer's params `prefix_k` / `prefix_v` instead.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask: Mask, kv_cache=None, write_index=None,
               deterministic: bool = True, prefix=None, layer=0,
               kv_span: int | None = None):
    cfg = self.cfg
    if cfg.virtual_tokens == 'prefix':
      # PEFT's PrefixEncoder without projection is an nn.Embedding: N(0, 1) init.
      shape = (cfg.num_virtual_tokens, cfg.num_kv_heads, cfg.head_dim)
      names = (None, axes.KV_HEADS, axes.HEAD_DIM)
      param = lambda name: self.param(
          name, nn.with_logical_partitioning(nn.initializers.normal(1.0), names), shape,
          jnp.float32)[None]  # [1, V, kv_heads, head_dim]; float32 like LoRA's adapters
      prefix = (param('prefix_k'), param('prefix_v'))
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
    if cfg.qk_norm:  # Qwen3: per-head RMSNorm of queries and keys, before RoPE
      q = RMSNorm(cfg, axis_name=axes.HEAD_DIM, name='q_norm')(q)
      k = RMSNorm(cfg, axis_name=axes.HEAD_DIM, name='k_norm')(k)
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
      cache_k, cache_v = kv_cache  # [layers, batch, max_len, kv_heads, head_dim]
      # Row b's T entries go to [layer, b, write_index[b] + t]: one scatter into the stacked
      # cache in its own layout, so nothing else of it is copied (slots past max_len are
      # dropped, never clamped onto valid ones).
      b, t = k.shape[:2]
      rows = jnp.arange(b)[:, None]  # [batch, 1]
      slots = write_index[:, None] + jnp.arange(t)[None, :]  # [batch, length]
      write = lambda c, new: c.at[layer, rows, slots].set(new.astype(c.dtype), mode='drop')
      # The cache keeps its own layout (`transformer.CACHE_AXES`): batch, kv heads and, for
      # long contexts, its slots split over the mesh as the rules say, never gathered.
      constrain = lambda c: nn.with_logical_constraint(c, (axes.LAYERS,) + CACHE_LAYER_AXES)
      cache_k = constrain(write(cache_k, k))
      cache_v = constrain(write(cache_v, v))
      kv_cache = (cache_k, cache_v)
      span = kv_span or cache_k.shape[2]
      k = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False)[:b, :span]
      v = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False)[:b, :span]
      k = nn.with_logical_constraint(k, CACHE_LAYER_AXES)
      v = nn.with_logical_constraint(v, CACHE_LAYER_AXES)

    if prefix is None:
      out = attention(q, k, v, mask, implementation=cfg.attention)  # [batch, length, heads, head_dim]
    else:
      out = attention_with_prefix(q, k, v, mask, *prefix, positions=positions)
    out = DenseGeneral(features=cfg.embed_dim, axis=(-2, -1), use_bias=cfg.out_bias, cfg=cfg,
                       kernel_axes=(axes.HEADS, axes.HEAD_DIM, axes.EMBED),
                       adapter=adapters.for_target(cfg, 'o'), name='o',
                       out_proj=True)(out, deterministic)
    return out, kv_cache
