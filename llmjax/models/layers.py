"""Small layers: projections, norms, embeddings, MLPs.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); `param_dtype`
is the storage dtype and `cfg.dtype` the compute dtype. Norm statistics are float32.
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.models import axes
from llmjax.models.config import ModelConfig


def _init(cfg: ModelConfig, out_proj: bool = False):
  # GPT-2 (Radford et al. 2019, sec. 2.3): residual projections scaled by 1/sqrt(2 * layers)
  # so the residual stream's variance does not grow with depth.
  std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if out_proj else cfg.init_std
  return nn.initializers.normal(stddev=std)


class DenseGeneral(nn.Module):
  """x @ kernel over the trailing `axis` dims of x, to `features` (int or tuple) dims."""
  features: int | Sequence[int]
  kernel_axes: tuple[str, ...]
  cfg: ModelConfig
  axis: int | Sequence[int] = -1
  use_bias: bool = False
  out_proj: bool = False
  out_dtype: jnp.dtype | None = None  # default: the compute dtype; float32 for logits

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    contract = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    contract = tuple(a % x.ndim for a in contract)
    in_shape = tuple(x.shape[a] for a in contract)
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(_init(self.cfg, self.out_proj), self.kernel_axes),
        in_shape + features, jnp.dtype(self.cfg.param_dtype))
    dtype = jnp.dtype(self.cfg.dtype)
    # Contracted dims are trailing here; as one 2-D matmul [tokens, in] @ [in, out] the weight
    # gradient is a plain matmul too (XLA:CPU runs a (batch, length)-contracting dot_general
    # several times slower; on TPU/GPU the two forms compile the same).
    lead = x.shape[:x.ndim - len(contract)]
    out = jnp.dot(x.astype(dtype).reshape(-1, math.prod(in_shape)),
                  kernel.astype(dtype).reshape(math.prod(in_shape), -1),
                  preferred_element_type=jnp.float32)
    if self.cfg.lora_rank and self.name in self.cfg.lora_targets:
      out = out + self._lora_delta(x.astype(dtype).reshape(-1, math.prod(in_shape)), in_shape,
                                   features)
    out = out.reshape(*lead, *features).astype(self.out_dtype or dtype)
    if self.use_bias:
      bias = self.param(
          'bias', nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[len(contract):]),
          features, jnp.dtype(self.cfg.param_dtype))
      out = out + bias.astype(out.dtype)
    return out


  def _lora_delta(self, x2d, in_shape, features):
    """(alpha / rank) * x @ A @ B for x2d [tokens, in] -> [tokens, out] float32.

    A [in..., rank] starts as PEFT's default (uniform +-1/sqrt(in)), B [rank, out...] at zero,
    so a fresh adapter leaves the model unchanged. Both are float32 (adapters are tiny; Adam
    updates to bfloat16 ones would round away). x @ A first: [tokens, rank] is small, and the
    [in, out] product A @ B is never formed.
    """
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    n_in = len(in_shape)
    a = self.param(
        'lora_a', nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform',
                                             in_axis=tuple(range(n_in)), out_axis=-1),
            self.kernel_axes[:n_in] + (axes.LORA,)),
        in_shape + (cfg.lora_rank,), jnp.float32)
    b = self.param(
        'lora_b', nn.with_logical_partitioning(nn.initializers.zeros,
                                               (axes.LORA,) + self.kernel_axes[n_in:]),
        (cfg.lora_rank,) + features, jnp.float32)
    h = jnp.dot(x2d, a.astype(dtype).reshape(-1, cfg.lora_rank),
                preferred_element_type=jnp.float32)  # [tokens, rank]
    h = (h * (cfg.lora_alpha / cfg.lora_rank)).astype(dtype)
    return jnp.dot(h, b.astype(dtype).reshape(cfg.lora_rank, -1),
                   preferred_element_type=jnp.float32)  # [tokens, out]


class RMSNorm(nn.Module):
  """x / rms(x) * scale (Zhang & Sennrich 2019); statistics in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, (axes.EMBED,)),
                       (x.shape[-1],), jnp.dtype(self.cfg.param_dtype))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    # Llama casts back to the activation dtype before the scale (transformers' LlamaRMSNorm).
    return y.astype(self.cfg.dtype) * scale.astype(self.cfg.dtype)


class LayerNorm(nn.Module):
  """(x - mean) / std * scale + bias (Ba et al. 2016); statistics in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    pd = jnp.dtype(self.cfg.param_dtype)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, (axes.EMBED,)), (dim,), pd)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED,)), (dim,), pd)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps) * scale + bias
    return y.astype(self.cfg.dtype)


NORMS: dict[str, type[nn.Module]] = {'rmsnorm': RMSNorm, 'layernorm': LayerNorm}


class Embed(nn.Module):
  """Token embedding [vocab, embed]; `decode` is the tied LM head."""
  cfg: ModelConfig

  def setup(self):
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(nn.initializers.normal(self.cfg.init_std),
                                                  (axes.VOCAB, axes.EMBED)),
        (self.cfg.vocab_size, self.cfg.embed_dim), jnp.dtype(self.cfg.param_dtype))

  def encode(self, tokens):
    """tokens [batch, length] -> [batch, length, embed] in the compute dtype."""
    return jnp.take(self.embedding, tokens, axis=0).astype(self.cfg.dtype)

  def decode(self, x):
    """x [batch, length, embed] -> logits [batch, length, vocab] (float32 accumulation)."""
    dtype = jnp.dtype(self.cfg.dtype)
    b, l, d = x.shape
    # As a 2-D matmul for the same XLA:CPU reason as DenseGeneral.
    logits = jnp.einsum('nd,vd->nv', x.astype(dtype).reshape(b * l, d),
                        self.embedding.astype(dtype), preferred_element_type=jnp.float32)
    return logits.reshape(b, l, -1)  # [batch, length, vocab]


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)) (Shazeer 2020), as in Llama, Qwen2 and Mistral."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = DenseGeneral(cfg.mlp_dim, (axes.EMBED, axes.MLP), cfg, use_bias=cfg.mlp_bias, name='gate')(x)
    up = DenseGeneral(cfg.mlp_dim, (axes.EMBED, axes.MLP), cfg, use_bias=cfg.mlp_bias, name='up')(x)
    h = nn.silu(gate) * up  # [batch, length, mlp]
    h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.MLP))
    return DenseGeneral(cfg.embed_dim, (axes.MLP, axes.EMBED), cfg, use_bias=cfg.mlp_bias,
                        out_proj=True, name='down')(h)


class GeluMLP(nn.Module):
  """fc2(gelu(fc1(x))) with the tanh approximation, as in GPT-2 ('gelu_new')."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = DenseGeneral(cfg.mlp_dim, (axes.EMBED, axes.MLP), cfg, use_bias=cfg.mlp_bias, name='up')(x)
    h = nn.gelu(h, approximate=True)  # [batch, length, mlp]
    h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.MLP))
    return DenseGeneral(cfg.embed_dim, (axes.MLP, axes.EMBED), cfg, use_bias=cfg.mlp_bias,
                        out_proj=True, name='down')(h)


MLPS: dict[str, type[nn.Module]] = {'swiglu': SwiGLU, 'gelu': GeluMLP}
