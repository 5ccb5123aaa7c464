"""`Mask`: the description of which keys each query may see, shared by every attention
implementation (the model's entry point, the plain-jnp references and the Pallas kernels).

It lives in the kernel layer, not in `llmjax.models`, so that imports run one way: the model
imports the kernels, the kernels never import the model (`tests/test_layering.py`).
`llmjax.models.attention` re-exports it.
"""

import flax.struct
import jax
import jax.numpy as jnp


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
