"""Adapters on a projection: LoRA, rsLoRA and DoRA, composed with `layers.DenseGeneral`.

The model decides at each call site which projections are adaptable, by target name:

    DenseGeneral(features, kernel_axes, cfg, adapter=adapters.for_target(cfg, 'q'), name='q')

`for_target` returns None (a plain projection) unless `cfg.lora_rank > 0` and the target is in
`cfg.lora_targets`, else a frozen `LoRA` / `DoRA` value holding that target's rank, scaling and
dropout. The projection computes `base = x @ kernel` and hands (x, base, kernel) to the adapter,
which declares its own leaves in the projection's scope, so the params keep their paths
(`attn/q/kernel`, `attn/q/lora_a`, `attn/q/lora_b`, with DoRA `attn/q/lora_magnitude`): the
checkpoints, sharding rules, optimizer masks and `interop.peft` see the same tree. The module's
name plays no part: renaming it cannot drop its adapter.

The base kernel reaches both the matmul and the adapter (DoRA's weight norm) only through the
projection's `kernel_store` hook (`layers.stored_kernel`: the plain 'kernel' param). A quantized
base (model.base_quant) is another store with the same signature,
    store(module, shape, init, kernel_axes) -> kernel [in..., out...]
that declares its own leaves on `module` and returns the dequantized kernel; adapters compose
with it unchanged.

Math, as PEFT 0.21 (`peft/tuners/lora/layer.py`, `dora.py`), for x [tokens, in]:
    LoRA    y = x W + s * (drop(x) A) B,   s = alpha / r         (Hu et al. 2021)
    rsLoRA  the same with s = alpha / sqrt(r)                    (Kalajdzievski 2023)
    DoRA    y = x W + (g - 1) * drop(x) W + g * s * (drop(x) A) B,
            g = m / ||W + s A B||_c (per output feature, norm over the input dims, treated
            as a constant: no gradient, DoRA sec. 4.3)          (Liu et al. 2024)
Without dropout DoRA is y = g * (x W + s x A B): the magnitude m times the unit-norm direction.
The bias (added by the projection after the adapter) is not rescaled, as in PEFT.
"""

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.models import axes
from llmjax.models.config import ModelConfig

# The adapter leaves of a projection, in the order they are created.
LORA_LEAVES = ('lora_a', 'lora_b')
DORA_LEAVES = LORA_LEAVES + ('lora_magnitude',)


def scale(alpha: float, rank: int, rslora: bool) -> float:
  """PEFT's `scaling`: alpha / sqrt(r) with use_rslora (rank-stabilised), else alpha / r."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def column_norms(kernel2d: jax.Array) -> jax.Array:
  """||W||_c of a kernel [..., in, out]: the L2 norm of each output feature's weights,
  [..., out] float32 (torch.linalg.norm(weight [out, in], dim=1) in PEFT)."""
  w = kernel2d.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(w * w, axis=-2))


def _dropout(module: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
  """Inverted dropout (torch.nn.Dropout) with the module's 'dropout' rng; identity unless
  training (deterministic=False) with rate > 0."""
  if deterministic or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


@dataclasses.dataclass(frozen=True)
class LoRA:
  """A LoRA adapter's settings (hashable: a Flax module attribute). rslora picks the scaling."""
  rank: int
  alpha: float
  dropout: float = 0.0
  rslora: bool = False
  # The base output reaches the adapted one unscaled (base + delta), so its cotangent is the
  # adapted output's (`layers.matmul` relies on it).
  adds_base: ClassVar[bool] = True

  @property
  def scale(self) -> float:
    return scale(self.alpha, self.rank, self.rslora)

  def factors(self, module: nn.Module, in_shape: tuple[int, ...], features: tuple[int, ...]):
    """The leaves lora_a [in..., r] and lora_b [r, out...], declared in `module`'s scope.

    A starts as PEFT's default (kaiming-uniform with a=sqrt(5): uniform +-1/sqrt(in)), B at
    zero, so a fresh adapter leaves the model unchanged. Both are float32 (adapters are tiny;
    Adam updates to bfloat16 ones would round away).
    """
    n_in, kernel_axes = len(in_shape), module.kernel_axes
    a = module.param(
        'lora_a', nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform',
                                             in_axis=tuple(range(n_in)), out_axis=-1),
            kernel_axes[:n_in] + (axes.LORA,)),
        in_shape + (self.rank,), jnp.float32)
    b = module.param(
        'lora_b', nn.with_logical_partitioning(nn.initializers.zeros,
                                               (axes.LORA,) + kernel_axes[n_in:]),
        (self.rank,) + features, jnp.float32)
    return a, b

  def delta(self, x2d: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """s * (x A) B for x [tokens, in] -> [tokens, out] float32. x A first: [tokens, rank] is
    small, and the [in, out] product A B is never formed."""
    dtype = x2d.dtype
    h = jnp.dot(x2d, a.astype(dtype).reshape(-1, self.rank),
                preferred_element_type=jnp.float32)  # [tokens, rank]
    h = (h * self.scale).astype(dtype)
    return jnp.dot(h, b.astype(dtype).reshape(self.rank, -1),
                   preferred_element_type=jnp.float32)  # [tokens, out]

  def __call__(self, module: nn.Module, x2d: jax.Array, base: jax.Array, kernel: jax.Array,
               in_shape: tuple[int, ...], features: tuple[int, ...],
               deterministic: bool = True) -> jax.Array:
    """The adapted output [tokens, out] float32 from x [tokens, in] (compute dtype), the base
    output base = x W [tokens, out] float32 and the base kernel [in..., out...]."""
    a, b = self.factors(module, in_shape, features)
    return base + self.delta(_dropout(module, x2d, self.dropout, deterministic), a, b)


@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
  """Weight-decomposed LoRA: LoRA's direction update plus a learned magnitude per output
  feature, `lora_magnitude` [out...] float32, initialised to ||W||_c so a fresh adapter is the
  base model."""
  adds_base: ClassVar[bool] = False  # the base output is scaled by magnitude / norm

  def __call__(self, module, x2d, base, kernel, in_shape, features, deterministic=True):
    a, b = self.factors(module, in_shape, features)
    kernel2d = kernel.reshape(math.prod(in_shape), -1)  # [in, out]
    magnitude = module.param(
        'lora_magnitude', nn.with_logical_partitioning(
            lambda rng, shape, dtype: column_norms(kernel2d).reshape(shape).astype(dtype),
            module.kernel_axes[len(in_shape):]),
        features, jnp.float32)
    norm = jax.lax.stop_gradient(self.weight_norm(kernel2d, a, b))  # [out]
    g = magnitude.reshape(-1) / norm  # [out]
    x_in = _dropout(module, x2d, self.dropout, deterministic)
    # PEFT: with dropout active the base term is recomputed from the dropped-out input.
    base_in = base if x_in is x2d else jnp.dot(x_in, kernel2d.astype(x_in.dtype),
                                               preferred_element_type=jnp.float32)
    return base + (g - 1) * base_in + g * self.delta(x_in, a, b)

  def weight_norm(self, kernel2d: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """||W + s A B||_c [out] float32 for kernel [in, out], a [in..., r], b [r, out...]."""
    ab = jnp.dot(a.reshape(-1, self.rank).astype(jnp.float32),
                 b.reshape(self.rank, -1).astype(jnp.float32))  # [in, out]
    return column_norms(kernel2d.astype(jnp.float32) + self.scale * ab)


def rank_of(cfg: ModelConfig, target: str) -> int:
  """The adapter rank of `target`: model.lora_ranks[target] if given, else model.lora_rank."""
  return int(cfg.lora_ranks.get(target, cfg.lora_rank))


def for_target(cfg: ModelConfig, target: str) -> LoRA | None:
  """The adapter of the projection `target` (a name of config.LORA_TARGETS), or None when it
  has none (no LoRA, or not in model.lora_targets)."""
  if not cfg.lora_rank or target not in cfg.lora_targets:
    return None
  kind = DoRA if cfg.use_dora else LoRA
  return kind(rank=rank_of(cfg, target), alpha=float(cfg.lora_alpha),
              dropout=float(cfg.lora_dropout), rslora=bool(cfg.use_rslora))
