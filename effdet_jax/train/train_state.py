"""The train state: everything a step reads and writes, as one pytree.

It is sharded, donated to the jitted step and checkpointed as a whole, so a resumed run continues
with the same weights, optimizer moments, EMA copies, step counter and random key.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """``step``: int32 count of applied optimizer steps. ``rng``: base key (uint32 [2] raw key);
    step ``i`` uses ``fold_in(rng, i)``. ``ema_*`` mirror ``params``/``batch_stats``."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    rng: jax.Array


def create_train_state(
    model, tx: optax.GradientTransformation, rng: jax.Array, image_size: int
) -> TrainState:
    """Initialises the model on a [1, S, S, 3] dummy batch (pure; jit it with out_shardings).

    ``rng`` is a raw uint32 key; it is split into the init key and the training key.
    """
    init_rng, train_rng = jax.random.split(rng)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init(init_rng, images, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=params,
        ema_batch_stats=batch_stats,
        rng=train_rng,
    )
