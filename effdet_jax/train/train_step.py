"""The jitted training step: forward, losses, gradients, optimizer, EMA, non-finite guard.

One call = one optimizer step over the global batch. With ``grad_accum_steps = k`` the batch is
split into k micro-batches whose gradients are averaged (BN statistics advance per micro-batch, as
k real steps would). Under a sharded ``jax.jit`` BatchNorm statistics are already computed over the
global (micro-)batch, i.e. synchronized BN, without any ``axis_name``.

A non-finite loss or gradient leaves ``params``, ``batch_stats``, ``opt_state`` and the EMA copies
unchanged (the step counter and therefore the input position still advance); the metrics carry the
non-finite values so the host can name the offending part and, by policy, stop or go on.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from effdet_jax.train import ema as ema_lib
from effdet_jax.train.train_state import TrainState

TRAIN_KEYS = ("images", "boxes", "classes")  # what the step reads from a batch


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """``ema_decay``: 0 disables the EMA update; ``grad_accum_steps``: micro-batches per step."""

    ema_decay: float
    grad_accum_steps: int = 1


def _split_micro(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[B, ...] -> [k, B/k, ...] where micro-batch i holds rows i, i+k, i+2k, ...

    Taking strided rows keeps every micro-batch spread evenly over a batch that is sharded in
    contiguous blocks along ``data`` (no resharding), given B/k divisible by the data size.
    """

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    schedule: Callable[[jax.Array], jax.Array],
    options: StepOptions,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """``train_step(state, batch) -> (state, metrics)``, pure; jit it with shardings.

    ``loss_fn(cls_outputs, box_outputs, batch, params) -> (total, parts)`` (``objective``).
    ``metrics`` are float32 scalars: ``loss`` (total, L2 included), the loss parts, ``grad_norm``
    (before clipping), ``learning_rate`` and ``finite`` (1.0 when the update was applied).
    """
    k = options.grad_accum_steps

    def micro_grads(params, batch_stats, batch, rng):
        def objective(p):
            (cls_out, box_out), updates = model.apply(
                {"params": p, "batch_stats": batch_stats},
                batch["images"],
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": rng},
            )
            total, parts = loss_fn(cls_out, box_out, batch, p)
            return total, (parts, updates["batch_stats"])

        (det, (parts, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return det, parts, new_stats, grads

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        batch = {key: batch[key] for key in TRAIN_KEYS}
        rng = jax.random.fold_in(state.rng, state.step)
        if k == 1:
            det, parts, new_stats, grads = micro_grads(state.params, state.batch_stats, batch, rng)
        else:

            def body(carry, xs):
                stats, grad_sum, det_sum, parts_sum = carry
                i, micro = xs
                det, parts, stats, grads = micro_grads(
                    state.params, stats, micro, jax.random.fold_in(rng, i)
                )
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
                parts_sum = jax.tree.map(jnp.add, parts_sum, parts)
                return (stats, grad_sum, det_sum + det, parts_sum), None

            micro = _split_micro(batch, k)
            first = jax.tree.map(lambda x: x[0], micro)
            parts_shape = jax.eval_shape(
                lambda: micro_grads(state.params, state.batch_stats, first, rng)[1]
            )
            zeros = (
                state.batch_stats,
                jax.tree.map(jnp.zeros_like, state.params),
                jnp.zeros((), jnp.float32),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), parts_shape),
            )
            (new_stats, grad_sum, det_sum, parts_sum), _ = jax.lax.scan(
                body, zeros, (jnp.arange(k), micro)
            )
            grads = jax.tree.map(lambda g: g / k, grad_sum)
            det = det_sum / k
            parts = jax.tree.map(lambda p: p / k, parts_sum)

        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        finite = jnp.isfinite(det) & jnp.isfinite(grad_norm)
        for value in jax.tree.leaves(parts):
            finite &= jnp.isfinite(value)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_step = state.step + 1
        if options.ema_decay > 0:
            decay = ema_lib.ema_decay(options.ema_decay, new_step)
            ema_params = ema_lib.update_ema(state.ema_params, new_params, decay)
            ema_stats = ema_lib.update_ema(state.ema_batch_stats, new_stats, decay)
        else:
            ema_params, ema_stats = new_params, new_stats
        new_state = state.replace(
            step=new_step,
            params=keep_if_finite(new_params, state.params),
            batch_stats=keep_if_finite(new_stats, state.batch_stats),
            opt_state=keep_if_finite(new_opt_state, state.opt_state),
            ema_params=keep_if_finite(ema_params, state.ema_params),
            ema_batch_stats=keep_if_finite(ema_stats, state.ema_batch_stats),
        )
        metrics = {
            "loss": det,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "finite": finite.astype(jnp.float32),
            **parts,
        }
        return new_state, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)

    return train_step
