"""The decoder-only Transformer: embeddings, a stack of pre-norm blocks, the LM head.

    x = embed(tokens) (+ learned positions)
    for each layer:  x = x + attn(norm(x));  x = x + mlp(norm(x))   (mlp: dense or MoE)
    logits = head(norm(x))            (model.head='lm')
    scores = score(norm(x))[..., 0]   (model.head='score': a reward model, one scalar per position)

Layers are stacked with `nn.scan` (one compiled block whatever the depth) and rematerialised
by a named policy. The KV cache is an explicit value passed in and returned.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from llmjax.models import adapters, axes
from llmjax.models.attention import CACHE_LAYER_AXES, Attention, Mask
from llmjax.models.config import ModelConfig
from llmjax.models.layers import MLPS, NORMS, DenseGeneral, Embed
from llmjax.models.moe import MoE

# What the backward pass may keep from the forward pass instead of recomputing it.
REMAT_POLICIES = {
    'none': None,  # keep everything: fastest, most memory
    'full': jax.checkpoint_policies.nothing_saveable,  # keep only block inputs
    'dots': jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'qkv_proj': jax.checkpoint_policies.save_only_these_names('query_proj', 'key_proj', 'value_proj'),
}


@flax.struct.dataclass
class Cache:
  """KV cache of all layers. Sequence b holds `lengths[b]` valid entries."""
  k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  lengths: jax.Array  # [batch] int32

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> 'Cache':
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

  def constrain(self) -> 'Cache':
    """The cache laid out on the context mesh by the active logical rules (`CACHE_AXES`);
    a no-op without a mesh. Inside jit."""
    k = nn.with_logical_constraint(self.k, CACHE_AXES)
    v = nn.with_logical_constraint(self.v, CACHE_AXES)
    return Cache(k, v, nn.with_logical_constraint(self.lengths, (axes.BATCH,)))


# The cache's logical axes: split over the mesh like the activations (batch over data/fsdp,
# kv heads over tensor) and, where the rules map `kv_length` (context parallelism: to
# `sequence`), its slots too: a long context's cache then fits, and each decode step reads
# only the local slots (`kernels.sharded.shard_decode_attention`).
CACHE_AXES = (axes.LAYERS,) + CACHE_LAYER_AXES


class Block(nn.Module):
  """One pre-norm Transformer block. Signature fits `nn.scan`: (carry, *broadcast, xs) ->
  (carry, None), carry = (x [B, T, embed], kv): kv is the whole stacked cache ((k, v) each
  [layers, B, S, kv_heads, head_dim]) or None, and `layer` says which of its layers is this one.

  The cache rides in the carry, not in the scanned xs/ys, so a decode step writes only its new
  entries into the one buffer (in place: XLA aliases a while loop's carry), where per-layer
  slices in and a restacked cache out would copy the whole cache every step.
  """
  cfg: ModelConfig
  moe: bool = False  # the feed-forward is an MoE layer (`llmjax.models.moe.MoE`), not cfg.mlp

  @nn.compact
  def __call__(self, carry, positions, mask, write_index, layer, prefix=None,
               deterministic: bool = True, kv_span: int | None = None):
    cfg = self.cfg
    x, kv_cache = carry
    norm = NORMS[cfg.norm]
    h, kv_cache = Attention(cfg, name='attn')(norm(cfg, name='attn_norm')(x), positions, mask,
                                              kv_cache, write_index, deterministic, prefix,
                                              layer=layer, kv_span=kv_span)
    x = x + h
    h = norm(cfg, name='mlp_norm')(x)
    if self.moe:
      # Router statistics count real tokens only: padding (segment id 0) is routed but not
      # counted; decoding (no segment ids) counts every token.
      valid = None if mask.q_segment_ids is None else mask.q_segment_ids != 0
      x = x + MoE(cfg, name='moe')(h, valid, deterministic)
    else:
      x = x + MLPS[cfg.mlp](cfg, name='mlp')(h, deterministic)
    x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
    return (x, kv_cache), None


class Period(nn.Module):
  """One period of a layer pattern that mixes dense and MoE blocks (model.decoder_sparse_step:
  e.g. [dense, moe] for 2), as one step of the layer scan; `Block`'s signature, `layer` the
  index of the period's first layer and prefix leaves [period, ...] (or None). kinds[i]: block
  i is an MoE block. `block`: the (maybe rematerialised) Block class."""
  cfg: ModelConfig
  kinds: tuple[bool, ...]
  block: type = Block

  @nn.compact
  def __call__(self, carry, positions, mask, write_index, layer, prefix=None,
               deterministic: bool = True, kv_span: int | None = None):
    for i, moe in enumerate(self.kinds):
      block_prefix = None if prefix is None else jax.tree.map(lambda a: a[i], prefix)
      carry, _ = self.block(self.cfg, moe=moe, name=f'block_{i}')(
          carry, positions, mask, write_index, layer + i, block_prefix, deterministic, kv_span)
    return carry, None


class Transformer(nn.Module):
  """Decoder-only LM.

  __call__(tokens [B, T], positions [B, T] | None, segment_ids [B, T] | None, cache | None)
    -> (logits [B, T, vocab] float32, cache | None)
  With cfg.head='score' the output is scores [B, T] float32 instead of logits: the scalar head
  at every position (a reward model reads it at each sequence's last token).

  positions default to 0..T-1 (plus the cache lengths when decoding); segment_ids mark packed
  documents (0 = padding), and tokens only attend within their own document.

  With V = cfg.num_virtual_tokens > 0 (prompt or prefix tuning) every layer's attention sees
  V virtual keys first, visible to every token (so to each packed document, as if each had
  the prompt before it), and the real tokens' positions are shifted by V (given or default),
  as PEFT's are (position ids 0..V+T-1 over the prompt and the tokens). Cache slots and
  lengths count the real tokens only. Prompt tuning computes its virtual tokens' keys and
  values by running `prompt_embedding` [V, embed] through the layers (causal: they never see
  the real tokens, so this equals PEFT's concatenation) once per call, batch 1.
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = Embed(cfg)
    if cfg.position == 'learned':
      self.pos_embed = self.param(
          'pos_embedding', nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                                        (axes.POSITIONS, axes.EMBED)),
          (cfg.max_seq_len, cfg.embed_dim), jnp.dtype(cfg.param_dtype))
    block = Block
    if cfg.remat != 'none':
      # deterministic and kv_span (arguments 7 and 8, counting self) are Python values:
      # static, not traced.
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                       static_argnums=(7, 8))
    if cfg.scan_layers:
      # One scan per group of `cfg.layer_groups()` (a dense or every-layer-sparse model: one,
      # named 'layers'); a group's step is one Block, or one `Period` of a mixed pattern.
      groups = cfg.layer_groups()
      scans = []
      for g, (_, repeats, kinds) in enumerate(groups):
        name = 'layers' if len(groups) == 1 else f'layers_{g}'
        target, kw = (block, dict(moe=kinds[0])) if len(kinds) == 1 else (
            Period, dict(kinds=kinds, block=block))
        scans.append(nn.scan(
            # Each layer its own init and dropout keys; the MoE router statistics (the 'aux'
            # collection) stacked per layer like the params.
            target, variable_axes={'params': 0, 'aux': 0},
            split_rngs={'params': True, 'dropout': True},
            # positions, mask, write_index, layer, prefix, deterministic, kv_span
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast, nn.broadcast),
            length=repeats,
            metadata_params={nn.PARTITION_NAME: axes.LAYERS})(cfg, name=name, **kw))
      self.scans = scans
    else:
      kinds = cfg.moe_layers
      self.blocks = [block(cfg, moe=kinds[i], name=f'layer_{i}') for i in range(cfg.num_layers)]
    self.final_norm = NORMS[cfg.norm](cfg)
    if cfg.virtual_tokens == 'prompt':
      # PEFT's PromptEmbedding is an nn.Embedding: N(0, 1) for a random init; a text init
      # replaces it after the base is loaded (`init_prompt_from_tokens`).
      self.prompt_embedding = self.param(
          'prompt_embedding', nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                           (None, axes.EMBED)),
          (cfg.num_virtual_tokens, cfg.embed_dim), jnp.float32)
    if cfg.head == 'score':
      # transformers' `score` nn.Linear(hidden, num_labels=1, bias=False).
      self.score = DenseGeneral(1, (axes.EMBED, axes.SCORE), cfg, out_dtype=jnp.float32)
    elif not cfg.tie_embeddings:
      self.head = DenseGeneral(cfg.vocab_size, (axes.EMBED, axes.VOCAB), cfg, out_dtype=jnp.float32,
                               adapter=adapters.for_target(cfg, 'head'))
    if cfg.value_head:
      # TRL's ValueHead: nn.Linear(hidden, 1) with a bias (values are not centred on zero).
      self.value_head = DenseGeneral(1, (axes.EMBED, axes.SCORE), cfg, use_bias=True,
                                     out_dtype=jnp.float32)

  def __call__(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None,
               return_hidden: bool = False, deterministic: bool = True,
               kv_span: int | None = None):
    """return_hidden: return the final-norm output [B, T, embed] instead of the logits, for
    losses that apply the head themselves in chunks (`logits`). deterministic=False: training,
    with model.lora_dropout on the adapters' inputs (needs a 'dropout' rng).

    Decoding with a cache of more rows than `tokens` has runs the batch in the cache's first B
    rows (the others are neither read nor written); kv_span (static) reads only the first
    kv_span slots of each row, which the caller guarantees hold all of it (lengths + T <=
    kv_span): a step's work then follows the rows and lengths in use, not the cache's size."""
    cfg = self.cfg
    b, t = tokens.shape
    offset = cache.lengths if cache is not None else jnp.zeros((b,), jnp.int32)
    if positions is None:
      positions = offset[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if cache is None:
      mask = Mask(causal=True, sliding_window=cfg.sliding_window,
                  q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
    else:
      # Decoding: keys are cache slots; slot j holds position j, valid below lengths + t.
      mask = Mask(causal=True, sliding_window=cfg.sliding_window, q_offset=cache.lengths,
                  kv_lengths=cache.lengths + t)

    prefix = self.prompt_kv(deterministic) if cfg.virtual_tokens == 'prompt' else None
    positions = positions + cfg.num_virtual_tokens  # the virtual tokens sit at 0..V-1

    x = self.embed.encode(tokens)  # [batch, length, embed]
    kv = (cache.k, cache.v) if cache is not None else None
    x, kv = self._stack(x, positions, mask, offset, kv, prefix, deterministic, kv_span)
    x = self.final_norm(x)
    if cache is not None:
      cache = Cache(kv[0], kv[1], cache.lengths + t)
    if cfg.value_head and self.is_initializing():
      self.values(x)  # a head no output below reads would get no params
    if return_hidden:
      return x, cache
    if cfg.head == 'score':
      return self.scores(x), cache
    return self.logits(x, deterministic), cache

  def _stack(self, x, positions, mask, write_index, kv, prefix, deterministic, kv_span=None):
    """Position embedding and all layers: x [B, T, embed] -> (x, kv); kv and prefix are
    (k, v) pairs with a leading [layers] dim, or None."""
    cfg = self.cfg
    if cfg.position == 'learned':
      x = x + jnp.take(self.pos_embed, positions, axis=0).astype(x.dtype)
    x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
    if cfg.scan_layers:
      for (first, repeats, kinds), scan in zip(cfg.layer_groups(), self.scans):
        p = len(kinds)
        # Each step's first layer: its index into the stacked cache and prefix.
        layers = first + p * jnp.arange(repeats, dtype=jnp.int32)
        group_prefix = None if prefix is None else jax.tree.map(
            lambda a: a[first:first + repeats * p].reshape(repeats, *((p,) if p > 1 else ()),
                                                           *a.shape[1:]), prefix)
        (x, kv), _ = scan((x, kv), positions, mask, write_index, layers, group_prefix,
                          deterministic, kv_span)
      return x, kv
    for i, blk in enumerate(self.blocks):
      layer_prefix = None if prefix is None else (prefix[0][i], prefix[1][i])
      (x, kv), _ = blk((x, kv), positions, mask, write_index, i, layer_prefix, deterministic,
                       kv_span)
    return x, kv

  def prompt_kv(self, deterministic: bool = True):
    """Prompt tuning's per-layer keys and values of its virtual tokens: (k, v) each
    [layers, 1, V, kv_heads, head_dim], from `prompt_embedding` run causally through the
    layers at positions 0..V-1 (written into a V-slot cache, which is what the cache holds)."""
    cfg = self.cfg
    n = cfg.num_virtual_tokens
    x = self.prompt_embedding.astype(cfg.dtype)[None]  # [1, V, embed]
    positions = jnp.arange(n, dtype=jnp.int32)[None]  # [1, V]
    zeros = Cache.zeros(cfg, 1, n)
    mask = Mask(causal=True, sliding_window=cfg.sliding_window, q_offset=zeros.lengths,
                kv_lengths=zeros.lengths + n)
    _, kv = self._stack(x, positions, mask, zeros.lengths, (zeros.k, zeros.v), None,
                        deterministic)
    return kv

  def scores(self, x):
    """The score head (cfg.head='score'): x [B, T, embed] -> scores [B, T] float32."""
    scores = self.score(x)[..., 0]  # [batch, length]
    return nn.with_logical_constraint(scores, (axes.BATCH, axes.LENGTH))

  def values(self, x):
    """PPO's value head (cfg.value_head): x [B, T, embed] -> values [B, T] float32, the value
    of the state at each position (before its target token is emitted)."""
    values = self.value_head(x)[..., 0]  # [batch, length]
    return nn.with_logical_constraint(values, (axes.BATCH, axes.LENGTH))

  def logits(self, x, deterministic: bool = True):
    """The LM head: final-norm output x [B, T, embed] -> logits [B, T, vocab] float32."""
    logits = self.embed.decode(x) if self.cfg.tie_embeddings else self.head(x, deterministic)
    return nn.with_logical_constraint(logits, (axes.BATCH, axes.LENGTH, axes.VOCAB))


def init_prompt_from_tokens(params, token_ids) -> dict:
  """`params` with `prompt_embedding` [V, embed] set to the token embeddings of `token_ids`
  repeated, then cut, to V entries: PEFT's prompt_tuning_init='TEXT' (PromptEmbedding: ids
  repeated ceil(V / len) times and truncated to V), from the model's (pretrained) embedding."""
  ids = list(token_ids)
  n = params['prompt_embedding'].shape[0]
  if not ids:
    raise ValueError('init_prompt_from_tokens: no token ids')
  ids = (ids * (-(-n // len(ids))))[:n]
  table = params['embed']['embedding']
  prompt = jnp.take(table, jnp.asarray(ids, jnp.int32), axis=0)
  return {**params, 'prompt_embedding': prompt.astype(params['prompt_embedding'].dtype)}


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8):
  """Initialised params (a plain pytree of arrays) for `cfg`."""
  model = Transformer(cfg)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return nn.meta.unbox(model.init(rng, tokens)['params'])


def logical_axes(cfg: ModelConfig):
  """The params pytree with a PartitionSpec of logical axis names at each leaf (no FLOPs)."""
  model = Transformer(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return nn.get_partition_spec(abstract)['params']
