"""The train state: everything a step reads and writes, and everything a checkpoint saves
besides the data iterator."""

import flax.struct
import jax
import optax

from llmjax.models import lora


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # uint32 [2] raw key data, so checkpoints hold a plain array

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, rng: jax.Array,
             adapters_only: bool = False) -> 'TrainState':
    """A fresh state; `adapters_only` (LoRA): optimizer state only for the adapter leaves."""
    import jax.numpy as jnp
    trainable = lora.split(params)[0] if adapters_only else params
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(trainable),
               rng=jax.random.key_data(rng))
