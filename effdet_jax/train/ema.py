"""Exponential moving average of the weights, as automl trains with it.

automl (tfa ``MovingAverage(dynamic_decay=True)`` / TF1 ``ExponentialMovingAverage`` with
``num_updates``) uses ``decay_t = min(decay, (1 + t) / (10 + t))`` where ``t`` is the optimizer step
count *after* the update (1 for the first one), and averages the BN moving statistics too.
"""

import jax
import jax.numpy as jnp


def ema_decay(decay: float, step_after_update: jax.Array) -> jax.Array:
    """``min(decay, (1 + t) / (10 + t))`` as float32; ``decay == 0`` gives 0 (EMA = weights)."""
    t = jnp.asarray(step_after_update, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def update_ema(ema_tree, new_tree, decay: jax.Array):
    """``ema <- decay * ema + (1 - decay) * new`` leaf by leaf (both trees have equal structure)."""
    return jax.tree.map(
        lambda e, n: (decay * e + (1.0 - decay) * n.astype(jnp.float32)).astype(e.dtype),
        ema_tree,
        new_tree,
    )
