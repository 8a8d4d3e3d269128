"""The training state: everything a step reads and writes, as one frozen pytree."""

from __future__ import annotations

import flax.struct
import jax
import optax


@flax.struct.dataclass
class TrainState:
    """Step counter, model parameters, optimizer state and a raw uint32 PRNG key.

    ``rng`` is the root of every on-device random draw of the run (e.g. DP noise, augmentation);
    each step derives its own key with ``fold_in(rng, step)`` so nothing is reused.
    """

    step: jax.Array
    params: optax.Params
    opt_state: optax.OptState
    rng: jax.Array
