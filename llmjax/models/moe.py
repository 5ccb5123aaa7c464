"""Sparse mixture-of-experts feed-forward (Mixtral, Qwen2-MoE / Qwen1.5-MoE, Qwen3-MoE).

    probs = softmax(router(x))                    float32, [tokens, experts]
    idx, gates = top-k of probs                   renormalised iff model.norm_topk_prob
    y = sum_k gates[k] * expert_idx[k](x)         SwiGLU experts, weights stacked [experts, ...]
      (+ sigmoid(shared_gate(x)) * shared_expert(x)   Qwen2-MoE)

Mixtral's gates are a softmax over the top-k logits; that is exactly softmax-over-all followed
by renormalising the top k (the common factor cancels), so Mixtral is `norm_topk_prob=True`
and there is one routing formula for every family (`route`).

Two ways to run the experts, neither of which materialises [tokens, experts, hidden]:
  `dropless`       token copies sorted by expert, grouped matmuls (`jax.lax.ragged_dot`) with
                   the per-expert group sizes: every token gets all its k experts (MegaBlocks,
                   Gale et al. 2022; MaxText's 'dropless' MoE).
  `with_capacity`  fixed shapes [experts, capacity, embed] (GShard, Lepikhin et al. 2020):
                   capacity = ceil(capacity_factor * tokens * k / experts); copies past an
                   expert's capacity are dropped (their gate's share of the output is lost) and
                   counted.

The router statistics each layer needs for the losses (transformers' load_balancing_loss_func
and the ST-MoE z-loss) are sown into the 'aux' collection as a `RouterStats`, per row summed
over the row's valid tokens (`llmjax.train.losses.moe_losses` reduces them).
"""

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from llmjax.models import axes
from llmjax.models.config import ModelConfig
from llmjax.models.layers import DenseGeneral, SwiGLU, _init, stored_kernel


@flax.struct.dataclass
class RouterStats:
  """One MoE layer's routing, summed per row over its valid (non-padding) tokens, float32.

  counts: [batch, experts] token copies routed to each expert (sum over experts = k x tokens)
  probs:  [batch, experts] sum of the full softmax router probabilities
  tokens: [batch] valid tokens routed
  z:      [batch] sum of logsumexp(router logits)^2 (ST-MoE's z-loss, Zoph et al. 2022 eq. 5)
  dropped: [] token copies dropped by the capacity (0 when dropless)
  Under the layer scan each field gets a leading [layers] dim.
  """
  counts: jax.Array
  probs: jax.Array
  tokens: jax.Array
  z: jax.Array
  dropped: jax.Array


def route(logits: jax.Array, k: int, norm_topk_prob: bool):
  """Top-k routing.

  logits: [tokens, experts] router logits (upcast to float32).
  Returns (idx [tokens, k] int32, gates [tokens, k] float32, probs [tokens, experts] float32):
  probs = softmax(logits); idx/gates its k largest (ties: the lower index, as torch.topk on
  CPU); gates renormalised to sum to 1 iff norm_topk_prob (Mixtral, Qwen3-MoE; Qwen2-MoE
  keeps the raw probabilities).
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  gates, idx = jax.lax.top_k(probs, k)
  if norm_topk_prob:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return idx.astype(jnp.int32), gates, probs


def _swiglu_experts(xs, w_gate, w_up, w_down, matmul):
  """silu(xs @ gate) * (xs @ up) @ down with `matmul(lhs, rhs)` doing the per-expert product."""
  h = nn.silu(matmul(xs, w_gate)) * matmul(xs, w_up)
  return matmul(h.astype(xs.dtype), w_down)


def dropless(x, idx, gates, w_gate, w_up, w_down):
  """Every token through its k experts, as grouped matmuls over token copies sorted by expert.

  x: [tokens, embed]; idx, gates: [tokens, k]; w_gate, w_up: [experts, embed, mlp];
  w_down: [experts, mlp, embed]. Returns [tokens, embed] float32 (gate-weighted sum).
  Memory: [tokens * k, mlp] for the hidden activations, never [tokens, experts, ...].
  """
  n, k = idx.shape
  num_experts = w_gate.shape[0]
  flat = idx.reshape(-1)  # [tokens * k], copy c belongs to token c // k
  order = jnp.argsort(flat, stable=True)  # copies grouped by expert, in token order within one
  xs = jnp.take(x, order // k, axis=0)  # [tokens * k, embed]
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [experts]
  matmul = lambda lhs, rhs: jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), sizes,
                                               preferred_element_type=jnp.float32)
  ys = _swiglu_experts(xs, w_gate, w_up, w_down, matmul)  # [tokens * k, embed], sorted
  # Unsort: copy order[i] is row i of ys (a permutation, so the scatter is a gather's inverse).
  y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True).reshape(n, k, -1)
  return jnp.einsum('nkd,nk->nd', y, gates.astype(jnp.float32))


def capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert: ceil(capacity_factor * tokens * k / experts) (GShard)."""
  return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


def with_capacity(x, idx, gates, w_gate, w_up, w_down, capacity_factor: float):
  """The experts on fixed shapes [experts, capacity, embed]; copies over capacity dropped.

  Slots are given first to every token's top-1 choice, then top-2, ... (GShard's priority),
  in token order within a rank. Arguments as `dropless`. Returns (y [tokens, embed] float32,
  dropped [] float32, the number of token copies that got no slot).
  """
  n, k = idx.shape
  num_experts = w_gate.shape[0]
  cap = capacity(n, k, num_experts, capacity_factor)
  rank_major = idx.T.reshape(-1)  # [k * tokens]: all top-1 choices first
  onehot = jax.nn.one_hot(rank_major, num_experts, dtype=jnp.int32)  # [k * tokens, experts]
  slot = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # [k * tokens]
  keep = slot < cap
  token = jnp.tile(jnp.arange(n), k)  # [k * tokens]
  # Dropped copies write out of range and are discarded (mode='drop').
  buf = jnp.zeros((num_experts, cap, x.shape[-1]), x.dtype)
  buf = buf.at[rank_major, jnp.where(keep, slot, cap)].set(x[token], mode='drop')
  matmul = lambda lhs, rhs: jnp.einsum('ecd,edf->ecf', lhs, rhs.astype(lhs.dtype),
                                       preferred_element_type=jnp.float32)
  out = _swiglu_experts(buf, w_gate, w_up, w_down, matmul)  # [experts, capacity, embed]
  ys = out[rank_major, jnp.minimum(slot, cap - 1)] * keep[:, None]  # [k * tokens, embed]
  y = jnp.einsum('knd,nk->nd', ys.reshape(k, n, -1), gates.astype(jnp.float32))
  return y, jnp.sum(~keep).astype(jnp.float32)


class ExpertKernel(nn.Module):
  """The stacked kernels [experts, in, out] of one projection of all experts, as one 'kernel'
  leaf (so weight decay, checkpoints and the HF maps treat it as every projection kernel)."""
  shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  cfg: ModelConfig
  out_proj: bool = False

  @nn.compact
  def __call__(self):
    return self.param('kernel', nn.with_logical_partitioning(_init(self.cfg, self.out_proj),
                                                             self.kernel_axes),
                      self.shape, jnp.dtype(self.cfg.param_dtype))


class MoE(nn.Module):
  """The sparse feed-forward block: x [batch, length, embed] -> [batch, length, embed].

  Params: router/kernel [embed, experts] (float32 logits; never quantized, replicated: it is
  small), gate/kernel, up/kernel [experts, embed, moe_mlp] and down/kernel [experts, moe_mlp,
  embed] (logical axes
  'expert', 'embed', 'mlp': the experts split over mesh.expert), and with
  model.shared_expert_mlp_dim > 0 `shared_expert` (a SwiGLU) and shared_gate/kernel [embed, 1].
  The stacked layout maps to Hugging Face's per-expert tensors by indexing the first axis.

  valid: [batch, length] bool, the tokens that count in the router statistics (not padding),
  or None (all).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, valid=None, deterministic: bool = True):
    cfg = self.cfg
    b, t, d = x.shape
    e, f, k = cfg.num_experts, cfg.moe_mlp_dim, cfg.num_experts_per_tok
    logits = DenseGeneral(e, (axes.EMBED, None), cfg, out_dtype=jnp.float32,
                          kernel_store=stored_kernel, name='router')(x)  # [batch, length, experts]
    logits = logits.reshape(b * t, e)
    idx, gates, probs = route(logits, k, cfg.norm_topk_prob)

    w_gate = ExpertKernel((e, d, f), (axes.EXPERT, axes.EMBED, axes.MLP), cfg, name='gate')()
    w_up = ExpertKernel((e, d, f), (axes.EXPERT, axes.EMBED, axes.MLP), cfg, name='up')()
    w_down = ExpertKernel((e, f, d), (axes.EXPERT, axes.MLP, axes.EMBED), cfg, out_proj=True,
                          name='down')()
    xs = x.reshape(b * t, d).astype(cfg.dtype)
    if cfg.moe_capacity_factor > 0:
      y, dropped = with_capacity(xs, idx, gates, w_gate, w_up, w_down, cfg.moe_capacity_factor)
    else:
      y, dropped = dropless(xs, idx, gates, w_gate, w_up, w_down), jnp.zeros((), jnp.float32)
    y = y.reshape(b, t, d)

    if cfg.shared_expert_mlp_dim:
      # Qwen2-MoE: a dense SwiGLU every token goes through, scaled by its own sigmoid gate.
      shared = SwiGLU(cfg, mlp_dim=cfg.shared_expert_mlp_dim, name='shared_expert')(
          x, deterministic).astype(jnp.float32)
      gate = DenseGeneral(1, (axes.EMBED, None), cfg, out_dtype=jnp.float32,
                          kernel_store=stored_kernel, name='shared_gate')(x)  # [b, t, 1]
      y = y + jax.nn.sigmoid(gate) * shared

    w = (jnp.ones((b, t), jnp.float32) if valid is None
         else valid.astype(jnp.float32))  # [batch, length]
    onehot_counts = jnp.zeros((b * t, e), jnp.float32).at[
        jnp.arange(b * t)[:, None], idx].add(1.0).reshape(b, t, e)
    z = jnp.square(jax.nn.logsumexp(logits, axis=-1)).reshape(b, t)
    self.sow('aux', 'router_stats', RouterStats(
        counts=jnp.einsum('bte,bt->be', onehot_counts, w),
        probs=jnp.einsum('bte,bt->be', probs.reshape(b, t, e), w),
        tokens=jnp.sum(w, axis=1), z=jnp.sum(z * w, axis=1), dropped=dropped))
    y = nn.with_logical_constraint(y.astype(cfg.dtype), (axes.BATCH, axes.LENGTH, axes.EMBED))
    return y


def router_stats(aux) -> RouterStats | None:
  """All MoE layers' `RouterStats` from an 'aux' collection (as `apply(..., mutable=['aux'])`
  returns it), stacked: counts/probs [moe_layers, batch, experts], tokens/z [moe_layers, batch],
  dropped [moe_layers]; None when the model has no MoE layer."""
  found = jax.tree.leaves(aux, is_leaf=lambda v: isinstance(v, RouterStats))
  found = [s for s in found if isinstance(s, RouterStats)]
  if not found:
    return None

  def flat(s: RouterStats) -> RouterStats:  # scanned layers carry leading stacked dims
    return RouterStats(counts=s.counts.reshape(-1, *s.counts.shape[-2:]),
                       probs=s.probs.reshape(-1, *s.probs.shape[-2:]),
                       tokens=s.tokens.reshape(-1, s.tokens.shape[-1]),
                       z=s.z.reshape(-1, s.z.shape[-1]), dropped=s.dropped.reshape(-1))
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *[flat(s) for s in found])
