"""Small layers: projections, norms, embeddings, MLPs.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); `param_dtype`
is the storage dtype and `cfg.dtype` the compute dtype. Norm statistics are float32.
"""

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax import quant
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


# ------------------------------------------------------------------ quantized base (QLoRA)
#
# model.base_quant stores each frozen projection kernel [in..., out...] quantized, in leaves
# beside the adapters (none is called 'kernel', so nothing can read it as a float kernel):
#
#   nf4:  kernel_nf4     uint8 [lead..., ceil(tail / 2)]   two NF4 indices a byte (`quant`)
#         kernel_absmax  f32   [lead..., ceil(tail / bs)]  one absmax per block of bs values
#     or, with model.quant_double,
#         kernel_absmax_q uint8 [lead..., ceil(tail / bs)], kernel_absmax_scale f32 [nb / 256],
#         kernel_absmax_offset f32 []
#   int8: kernel_int8    int8  [in..., out...]             per output channel
#         kernel_scale   f32   [1..., out...]
#   int4: kernel_int4    uint8 [in / 2, out...]            two values a byte (`quant.quantize_int4`)
#         kernel_int4_scale f32 [in / bs, out...]          one scale per group of bs inputs
#
# (in = prod(in...): int4 groups run along the flattened input axes, which keep the first
# input axis' logical name and the out axes theirs, so FSDP / tensor parallelism shard the
# packed leaf as the kernel; bs must divide in. The scales keep the out axes' names, their
# group axis replicated.)
#
# NF4 blocks run over the kernel flattened row-major (bitsandbytes' order, `quant.quantize_nf4`),
# so the flat arrays are reshaped to keep as many leading kernel axes as divide into whole
# blocks: `lead` = shape[:k], `tail` = prod(shape[k:]) for the largest k < ndim with
# tail % bs == 0 (k = 0, flat, when none). Those leading axes keep the kernel's logical names
# (so the packed bytes shard as the kernel does: FSDP over 'embed', tensor parallel over
# 'heads'/'mlp'); with k = ndim - 1 the packed last axis keeps the last name too (out / 2 must
# then divide by its mesh axis, which holds whenever out / 2 is a multiple of it). Block-level
# statistics are replicated along their last axis (out / bs need not divide by the mesh; they
# are 1/8 of the packed bytes) and the double-quant scale and offset are replicated whole.
# The leaves are frozen constants of the train step (`state.trainable_mask`: only adapters
# train), so they get no gradient, no Adam moments and no weight decay.

# quant.quantize_nf4_rows' arrays -> their param names.
_NF4_LEAF = {'data': 'kernel_nf4', 'absmax': 'kernel_absmax', 'absmax_q': 'kernel_absmax_q',
             'absmax_scale': 'kernel_absmax_scale', 'absmax_offset': 'kernel_absmax_offset'}
QUANT_LEAVES = ('kernel_nf4', 'kernel_absmax', 'kernel_absmax_q', 'kernel_absmax_scale',
                'kernel_absmax_offset', 'kernel_int8', 'kernel_scale', 'kernel_int4',
                'kernel_int4_scale')
# The leaf that holds a quantized kernel's values (one per quantized projection).
QUANT_VALUE_LEAVES = ('kernel_nf4', 'kernel_int8', 'kernel_int4')
_INT4_LEAF = {'values': 'kernel_int4', 'scale': 'kernel_int4_scale'}


def _nf4_layout(shape, kernel_axes, block_size, double):
  """{leaf: (shape, logical axes, dtype)} of an NF4 kernel of `shape` (one layer)."""
  k = quant.nf4_split(shape, block_size)
  lead = tuple(shape[:k])
  nb = -(-math.prod(shape[k:]) // block_size)  # blocks per row of `lead` (k = 0: in all)
  keep_last = (kernel_axes[k],) if k == len(shape) - 1 else (None,)
  out = {'kernel_nf4': (lead + (nb * block_size // 2,), tuple(kernel_axes[:k]) + keep_last,
                        jnp.uint8)}
  stat = (lead + (nb,), tuple(kernel_axes[:k]) + (None,))
  if double:
    out['kernel_absmax_q'] = stat + (jnp.uint8,)
    out['kernel_absmax_scale'] = ((-(-math.prod(stat[0]) // quant.ABSMAX_BLOCK_SIZE),), (None,),
                                  jnp.float32)
    out['kernel_absmax_offset'] = ((), (), jnp.float32)
  else:
    out['kernel_absmax'] = stat + (jnp.float32,)
  return out


def _int8_layout(shape, kernel_axes, n_in):
  scale_shape = (1,) * n_in + tuple(shape[n_in:])
  return {'kernel_int8': (tuple(shape), tuple(kernel_axes), jnp.int8),
          'kernel_scale': (scale_shape, (None,) * n_in + tuple(kernel_axes[n_in:]), jnp.float32)}


def _int4_layout(shape, kernel_axes, n_in, group_size):
  d_in, out = math.prod(shape[:n_in]), tuple(shape[n_in:])
  out_names = tuple(kernel_axes[n_in:])
  # The scales' group axis is replicated (in / bs need not divide by the mesh; they are 8 / bs
  # of the packed bytes), as NF4's block statistics are.
  return {'kernel_int4': ((d_in // 2,) + out, (kernel_axes[0],) + out_names, jnp.uint8),
          'kernel_int4_scale': ((d_in // group_size,) + out, (None,) + out_names, jnp.float32)}


def quant_layout(cfg: ModelConfig, shape, kernel_axes, n_in: int) -> dict:
  """{leaf name: (shape, logical axes, dtype)} of one (unstacked) kernel under cfg.base_quant."""
  if cfg.base_quant == 'nf4':
    return _nf4_layout(shape, kernel_axes, cfg.quant_block_size, cfg.quant_double)
  if cfg.base_quant == 'int4':
    quant.check_group_size(cfg.quant_block_size, math.prod(shape[:n_in]),
                           f'a projection kernel of shape {tuple(shape)}', 'model.quant_block_size')
    return _int4_layout(shape, kernel_axes, n_in, cfg.quant_block_size)
  return _int8_layout(shape, kernel_axes, n_in)


def quantize_kernel(cfg: ModelConfig, kernel: jax.Array, n_in: int) -> dict:
  """One kernel [in..., out...] (no stacked dims) -> its quantized leaves {name: array}."""
  if cfg.base_quant == 'nf4':
    leaves = quant.quantize_nf4_rows(kernel, cfg.quant_block_size, cfg.quant_double)
    return {_NF4_LEAF[name]: v for name, v in leaves.items()}
  if cfg.base_quant == 'int4':
    leaves = quant.quantize_int4(kernel, n_in, cfg.quant_block_size)
    return {_INT4_LEAF[name]: v for name, v in leaves.items()}
  q = quant.quantize_int8(kernel, axis=tuple(range(n_in, kernel.ndim)))
  return {'kernel_int8': q.values, 'kernel_scale': q.scale}


def dequantize_kernel(cfg: ModelConfig, leaves: dict, shape, dtype) -> jax.Array:
  """The kernel [shape] in `dtype` back from its quantized leaves (no stacked dims)."""
  if 'kernel_nf4' in leaves:
    rows = {name: leaves[leaf] for name, leaf in _NF4_LEAF.items() if leaf in leaves}
    return quant.dequantize_nf4_rows(rows, shape, cfg.quant_block_size, dtype)
  if 'kernel_int4' in leaves:
    return quant.dequantize_int4({name: leaves[leaf] for name, leaf in _INT4_LEAF.items()},
                                 shape, dtype)
  # dequantize_int8 broadcasts values * scale; the channel axes are implicit in scale's shape.
  q = quant.Int8Tensor(values=leaves['kernel_int8'], scale=leaves['kernel_scale'],
                       axis=(), dtype=jnp.dtype(cfg.param_dtype))
  return quant.dequantize_int8(q, dtype)


def _quantized_store(module: nn.Module, shape: tuple[int, ...], init, kernel_axes):
  """A kernel store (see `stored_kernel`) for cfg.base_quant: declares the quantized leaves
  and returns the kernel dequantized in the compute dtype (a constant: no gradient).

  At init the float kernel is drawn as `stored_kernel` would and quantized at once, so no
  float copy is kept; a pretrained base is quantized leaf by leaf by `quantize_params`."""
  cfg = module.cfg
  features = module.features
  n_in = len(shape) - (1 if isinstance(features, int) else len(features))
  layout = quant_layout(cfg, shape, kernel_axes, n_in)
  fresh = None
  if module.is_initializing():
    kernel = init(module.make_rng('params'), shape, jnp.dtype(cfg.param_dtype))
    fresh = quantize_kernel(cfg, kernel, n_in)
  leaves = {}
  for name, (leaf_shape, leaf_axes, dtype) in layout.items():
    # Flax also calls the initialiser abstractly on apply, to check the stored shape: zeros
    # stand in there (only their shape is used).
    value = (lambda name: lambda rng, s, d: jnp.zeros(s, d) if fresh is None else
             fresh[name].astype(d))(name)
    leaves[name] = module.param(name, nn.with_logical_partitioning(value, leaf_axes),
                                leaf_shape, dtype)
  kernel = dequantize_kernel(cfg, leaves, shape, jnp.dtype(cfg.dtype))
  return jax.lax.stop_gradient(kernel)


# cfg.base_quant -> the kernel store of the block projections. The LM head and a score head
# always use `stored_kernel` (QLoRA keeps the head in 16 bits: it is small and sensitive).
KERNEL_STORES: dict[str, Callable] = {
    '': stored_kernel,
    'nf4': _quantized_store,
    'int8': _quantized_store,
    'int4': _quantized_store,
}
# Projections whose output axis is one of these are heads: never quantized.
HEAD_OUT_AXES = (axes.VOCAB, axes.SCORE)


def _materialized_t(a):
  """a.T [n, m] of a [m, n], as a copy in row-major order.

  XLA:CPU's fast 16-bit matmuls (oneDNN) take only operands whose contracted dim is the
  lhs's last and the rhs's first; a dot_general over a transposed operand runs on the slow
  path, and XLA folds a plain transpose into the dot's layout instead of copying it
  (`python benchmarks/matmul_layouts.py`, 2 cores: bfloat16 x.T @ g 270 GFLOP/s, through this
  copy 1,348; g @ w.T 288 and 1,437). Through a trailing unit dim
  the transpose is a real copy, which costs a small fraction of the matmul it feeds."""
  m, n = a.shape
  return jnp.transpose(a.reshape(m, n, 1), (1, 0, 2)).reshape(n, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_16bit(x, w, copies: bool):
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _matmul_fwd(x, w, copies):
  return _matmul_16bit(x, w, copies), (x, w)


def _matmul_bwd(copies, res, g):
  x, w = res
  # Exact where the caller casts the output to x's 16-bit dtype (g then holds 16-bit values);
  # for a head's float32 output (`round_cotangent`) this is the one rounding of the cotangent.
  gx = g.astype(x.dtype)  # [tokens, out]
  t = _materialized_t if copies else jnp.transpose
  dx = jnp.dot(gx, t(w), preferred_element_type=jnp.float32)  # [tokens, in]
  dw = jnp.dot(t(x), gx, preferred_element_type=jnp.float32)  # [in, out]
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_16bit.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x, w, out_dtype, round_cotangent: bool = False):
  """x [tokens, in] @ w [in, out] -> [tokens, out], accumulated and returned in float32;
  `out_dtype`: what the caller casts it to, unscaled (a scaled output's cotangent is not
  16-bit: pass float32).

  On XLA:CPU with 16-bit operands and a 16-bit output, the backward matmuls (dx = g @ w.T,
  dw = x.T @ g) run on materialized transposes (`_materialized_t`), ~5x faster there. They
  compute what autodiff's would: the cotangent of a 16-bit output is 16-bit, products of
  16-bit values are exact in float32, and both accumulate in float32.

  round_cotangent (the heads: float32 logits or scores from 16-bit operands): the backward
  matmuls take the output's float32 cotangent rounded to x's 16-bit dtype, on every platform
  (on XLA:CPU through the same copies). That is what a TPU's default-precision dot does with a
  float32 operand anyway, what transformers' bf16 autocast and MaxText's bf16 logits do (their
  logits are 16-bit), and on a GPU it puts the head's backward on 16-bit tensor cores; the
  logits, softmax and loss stay float32. Elsewhere (float32 operands, a float32 output that
  is not a head's) the plain dot and its autodiff."""
  plain = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
  if not (jnp.dtype(x.dtype).itemsize == 2 and jnp.dtype(w.dtype).itemsize == 2):
    return plain(x, w)
  if round_cotangent:
    return jax.lax.platform_dependent(x, w, cpu=functools.partial(_matmul_16bit, copies=True),
                                      default=functools.partial(_matmul_16bit, copies=False))
  if jnp.dtype(out_dtype).itemsize != 2:
    return plain(x, w)
  # By the platform compiled for, not the host's: `llmjax.plan` compiles TPU programs on a CPU.
  return jax.lax.platform_dependent(x, w, cpu=functools.partial(_matmul_16bit, copies=True),
                                    default=plain)


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
  kernel_store: Callable | None = None  # None: KERNEL_STORES[cfg.base_quant] (heads: stored_kernel)

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    """deterministic=False (training) turns on the adapter's dropout ('dropout' rng)."""
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    contract = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    contract = tuple(a % x.ndim for a in contract)
    in_shape = tuple(x.shape[a] for a in contract)
    store = self.kernel_store
    if store is None:
      head = self.kernel_axes[-1] in HEAD_OUT_AXES
      store = stored_kernel if head else KERNEL_STORES[self.cfg.base_quant]
    kernel = store(self, in_shape + features, _init(self.cfg, self.out_proj), self.kernel_axes)
    dtype = jnp.dtype(self.cfg.dtype)
    # Contracted dims are trailing here; as one 2-D matmul [tokens, in] @ [in, out] the weight
    # gradient is a plain matmul too (XLA:CPU runs a (batch, length)-contracting dot_general
    # several times slower; on TPU/GPU the two forms compile the same).
    lead = x.shape[:x.ndim - len(contract)]
    x2d = x.astype(dtype).reshape(-1, math.prod(in_shape))  # [tokens, in]
    # What `out` is cast to on its way out (float32 where an adapter rescales it: DoRA), which
    # decides whether its cotangent is 16-bit (see `matmul`).
    cast_to = (self.out_dtype or dtype) if self.adapter is None or self.adapter.adds_base \
        else jnp.float32
    out = matmul(x2d, kernel.astype(dtype).reshape(math.prod(in_shape), -1),
                 cast_to, round_cotangent=self.kernel_axes[-1] in HEAD_OUT_AXES)  # [tokens, out]
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
  """x / rms(x) * scale (Zhang & Sennrich 2019) over the last dim; statistics in float32.
  axis_name: the logical name of that dim (Qwen3's q/k norms run over head_dim)."""
  cfg: ModelConfig
  axis_name: str = axes.EMBED

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
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
    logits = matmul(x.astype(dtype).reshape(b * l, d), self.embedding.astype(dtype).T,
                    jnp.float32, round_cotangent=True)  # [b * l, vocab]
    return logits.reshape(b, l, -1)  # [batch, length, vocab]


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)) (Shazeer 2020), as in Llama, Qwen2 and Mistral.
  mlp_dim: the hidden width, 0 = model.mlp_dim (an MoE's shared expert has its own)."""
  cfg: ModelConfig
  mlp_dim: int = 0

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.cfg
    width = self.mlp_dim or cfg.mlp_dim
    gate = DenseGeneral(width, (axes.EMBED, axes.MLP), cfg, use_bias=cfg.mlp_bias,
                        adapter=adapters.for_target(cfg, 'gate'), name='gate')(x, deterministic)
    up = DenseGeneral(width, (axes.EMBED, axes.MLP), cfg, use_bias=cfg.mlp_bias,
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
