"""Small layers: projections, norms, embeddings, MLPs.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); `param_dtype`
is the storage dtype and `cfg.dtype` the compute dtype. Norm statistics are float32.
"""

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.models import adapters, axes
from llmjax.models.config import ModelConfig


def _init(cfg: ModelConfig, out_proj: bool = False):
  # GPT-2 (Radford et al. 2019, sec. 2.3): residual projections scaled by 1/sqrt(2 * layers)
  # so the residual stream's variance does not grow with depth.
  std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if out_proj else cfg.init_std
  return nn.initializers.normal(stddev=std)


def stored_kernel(module: nn.Module, shape: tuple[int, ...], init, kernel_axes: tuple[str, ...]):
  """The base kernel [in..., out...] of a projection as stored: one 'kernel' param in
  model.param_dtype. `DenseGeneral.kernel_store`'s default; a quantized store has this
  signature, declares its own leaves on `module` and returns the dequantized kernel."""
  return module.param('kernel', nn.with_logical_partitioning(init, kernel_axes), shape,
                      jnp.dtype(module.cfg.param_dtype))


class DenseGeneral(nn.Module):
  """x @ kernel over the trailing `axis` dims of x, to `features` (int or tuple) dims.

  adapter: a LoRA/DoRA on this projection (`adapters.for_target(cfg, target)`, chosen by the
    call site), or None. It adds its leaves beside `kernel` and its term to the output.
  kernel_store: where the base kernel comes from (`stored_kernel`; a quantized base replaces
    it). The matmul and the adapter both take the kernel from it, nowhere else.
  """
  features: int | Sequence[int]
  kernel_axes: tuple[str, ...]
  cfg: ModelConfig
  axis: int | Sequence[int] = -1
  use_bias: bool = False
  out_proj: bool = False
  out_dtype: jnp.dtype | None = None  # default: the compute dtype; float32 for logits
  adapter: adapters.LoRA | None = None
  kernel_store: Callable = stored_kernel

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    """deterministic=False (training) turns on the adapter's dropout ('dropout' rng)."""
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    contract = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    contract = tuple(a % x.ndim for a in contract)
    in_shape = tuple(x.shape[a] for a in contract)
    kernel = self.kernel_store(self, in_shape + features, _init(self.cfg, self.out_proj),
                               self.kernel_axes)
    dtype = jnp.dtype(self.cfg.dtype)
    # Contracted dims are trailing here; as one 2-D matmul [tokens, in] @ [in, out] the weight
    # gradient is a plain matmul too (XLA:CPU runs a (batch, length)-contracting dot_general
    # several times slower; on TPU/GPU the two forms compile the same).
    lead = x.shape[:x.ndim - len(contract)]
    x2d = x.astype(dtype).reshape(-1, math.prod(in_shape))  # [tokens, in]
    out = jnp.dot(x2d, kernel.astype(dtype).reshape(math.prod(in_shape), -1),
                  preferred_element_type=jnp.float32)  # [tokens, out]
    if self.adapter is not None:
      out = self.adapter(self, x2d, out, kernel, in_shape, features, deterministic)
    out = out.reshape(*lead, *features).astype(self.out_dtype or dtype)
    if self.use_bias:
      bias = self.param(
          'bias', nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[len(contract):]),
          features, jnp.dtype(self.cfg.param_dtype))
      out = out + bias.astype(out.dtype)
    return out


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
  def __call__(self, x, deterministic: bool = True):
    cfg = self.cfg
    gate = DenseGeneral(cfg.mlp_dim, (axes.EMBED, axes.MLP), cfg, use_bias=cfg.mlp_bias,
                        adapter=adapters.for_target(cfg, 'gate'), name='gate')(x, deterministic)
    up = DenseGeneral(cfg.mlp_dim, (axes.EMBED, axes.MLP), cfg, use_bias=cfg.mlp_bias,
                      adapter=adapters.for_target(cfg, 'up'), name='up')(x, deterministic)
    h = nn.silu(gate) * up  # [batch, length, mlp]
    h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.MLP))
    return DenseGeneral(cfg.embed_dim, (axes.MLP, axes.EMBED), cfg, use_bias=cfg.mlp_bias,
                        out_proj=True, adapter=adapters.for_target(cfg, 'down'),
                        name='down')(h, deterministic)


class GeluMLP(nn.Module):
  """fc2(gelu(fc1(x))) with the tanh approximation, as in GPT-2 ('gelu_new')."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.cfg
    h = DenseGeneral(cfg.mlp_dim, (axes.EMBED, axes.MLP), cfg, use_bias=cfg.mlp_bias,
                     adapter=adapters.for_target(cfg, 'up'), name='up')(x, deterministic)
    h = nn.gelu(h, approximate=True)  # [batch, length, mlp]
    h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.MLP))
    return DenseGeneral(cfg.embed_dim, (axes.MLP, axes.EMBED), cfg, use_bias=cfg.mlp_bias,
                        out_proj=True, adapter=adapters.for_target(cfg, 'down'),
                        name='down')(h, deterministic)


MLPS: dict[str, type[nn.Module]] = {'swiglu': SwiGLU, 'gelu': GeluMLP}
