"""The train state: everything a step reads and writes, and everything a checkpoint saves
besides the data iterator."""

import flax.struct
import jax
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # uint32 [2] raw key data, so checkpoints hold a plain array

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, rng: jax.Array) -> 'TrainState':
    import jax.numpy as jnp
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
               rng=jax.random.key_data(rng))
