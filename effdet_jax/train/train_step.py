"""The train state and the jitted training step: forward, losses, gradients, optimizer, EMA,
non-finite guard.

``TrainState`` is everything a step reads and writes, as one pytree: it is sharded, donated to the
jitted step and checkpointed as a whole, so a resumed run continues with the same weights,
optimizer moments, EMA copies, step counter and random key.

One call = one optimizer step over the global batch. With ``grad_accum_steps = k`` the batch is
split into k micro-batches whose gradients are averaged (BN statistics advance per micro-batch, as
k real steps would). Under a sharded ``jax.jit`` BatchNorm statistics are already computed over the
global (micro-)batch, i.e. synchronized BN, without any ``axis_name``.

A non-finite loss or gradient leaves ``params``, ``batch_stats``, ``opt_state`` and the EMA copies
unchanged (the step counter and therefore the input position still advance); the metrics carry the
non-finite values so the host can name the offending part and, by policy, stop or go on.

The weights' exponential moving average follows automl (tfa ``MovingAverage(dynamic_decay=True)``
/ TF1 ``ExponentialMovingAverage`` with ``num_updates``): ``decay_t = min(decay, (1 + t) / (10 + t))``
where ``t`` is the optimizer step count *after* the update (1 for the first one), and the BN moving
statistics are averaged too.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from effdet_jax.models.finetune import trainable_mask

TRAIN_KEYS = ("images", "boxes", "classes")  # what the step reads from a batch


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
    return state_from_variables(tx, variables["params"], variables.get("batch_stats", {}), train_rng)


def state_from_variables(
    tx: optax.GradientTransformation, params: Any, batch_stats: Any, train_rng: jax.Array
) -> TrainState:
    """A step-0 state of given weights: EMA copies equal to them, a fresh optimizer state."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=params,
        ema_batch_stats=batch_stats,
        rng=train_rng,
    )


def ema_decay(decay: float, step_after_update: jax.Array) -> jax.Array:
    """``min(decay, (1 + t) / (10 + t))`` as float32; ``decay == 0`` gives 0 (EMA = weights)."""
    t = jnp.asarray(step_after_update, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def update_ema(ema_tree: Any, new_tree: Any, decay: jax.Array) -> Any:
    """``ema <- decay * ema + (1 - decay) * new`` leaf by leaf (both trees have equal structure)."""
    return jax.tree.map(
        lambda e, n: (decay * e + (1.0 - decay) * n.astype(jnp.float32)).astype(e.dtype),
        ema_tree,
        new_tree,
    )


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """``ema_decay``: 0 disables the EMA update; ``grad_accum_steps``: micro-batches per step.

    ``freeze``: regex over ``/``-joined parameter paths (``finetune.trainable_mask``); matching
    parameters and their EMA copies are carried over unchanged (bit-exact) and leave the L2 term
    and ``grad_norm``. ``freeze_bn``: the BN running statistics whose path matches ``freeze``
    (e.g. ``backbone/stem_bn/mean``) and their EMA copies are carried over unchanged too; the
    forward pass in training mode still normalises with the batch's statistics.
    """

    ema_decay: float
    grad_accum_steps: int = 1
    freeze: str = ""
    freeze_bn: bool = False


def keep_frozen(new: Any, old: Any, trained: Any) -> Any:
    """``new`` where ``trained`` (a pytree of Python bools) is True, else ``old`` unchanged."""
    return jax.tree.map(lambda n, o, t: n if t else o, new, old, trained)


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

    ``loss_fn(cls_outputs, box_outputs, batch, params) -> (total, parts)`` (``experiment.make_loss_fn``).
    ``metrics`` are float32 scalars: ``loss`` (total, L2 included), the loss parts, ``grad_norm``
    (before clipping), ``learning_rate`` and ``finite`` (1.0 when the update was applied).
    """
    k = options.grad_accum_steps
    freeze = options.freeze

    def micro_grads(params, batch_stats, batch, rng):
        trained = trainable_mask(params, freeze)

        def objective(p):
            (cls_out, box_out), updates = model.apply(
                {"params": p, "batch_stats": batch_stats},
                batch["images"],
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": rng},
            )
            # Frozen leaves become None, so the L2 term leaves them out.
            l2_params = jax.tree.map(lambda x, t: x if t else None, p, trained)
            total, parts = loss_fn(cls_out, box_out, batch, l2_params)
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

        trained = trainable_mask(state.params, freeze)
        grad_norm = optax.tree.norm(jax.tree.map(lambda g, t: g if t else None, grads, trained))
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = keep_frozen(optax.apply_updates(state.params, updates), state.params, trained)
        stats_trained = trainable_mask(state.batch_stats, freeze if options.freeze_bn else None)
        new_stats = keep_frozen(new_stats, state.batch_stats, stats_trained)

        finite = jnp.isfinite(det) & jnp.isfinite(grad_norm)
        for value in jax.tree.leaves(parts):
            finite &= jnp.isfinite(value)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_step = state.step + 1
        if options.ema_decay > 0:
            decay = ema_decay(options.ema_decay, new_step)
            ema_params = keep_frozen(update_ema(state.ema_params, new_params, decay),
                                     state.ema_params, trained)
            ema_stats = keep_frozen(update_ema(state.ema_batch_stats, new_stats, decay),
                                    state.ema_batch_stats, stats_trained)
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
