"""Learning-rate schedules and the optax optimizer, following google/automl's tf2 ``train_lib``.

automl's recipe: the learning rate is ``learning_rate * global_batch / 64``; a linear warm-up from
``lr_warmup_init`` (not scaled) over ``lr_warmup_epochs``; then cosine decay. Gradients are clipped
per tensor and then globally at ``clip_gradients_norm``. Weight decay is an L2 term in the loss
(``experiment.make_loss_fn``), not a decoupled optimizer decay.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from effdet_jax.models.finetune import trainable_mask

_DEFAULT_BATCH_SIZE = 64  # automl's learning rates are per 64 images


def total_steps(train_cfg: ml_collections.ConfigDict) -> int:
    """Number of optimizer steps of the run (``total_steps`` if set, else from epochs)."""
    if train_cfg.total_steps is not None:
        return int(train_cfg.total_steps)
    return int(train_cfg.num_epochs * steps_per_epoch(train_cfg))


def steps_per_epoch(train_cfg: ml_collections.ConfigDict) -> float:
    return train_cfg.num_examples_per_epoch / train_cfg.batch_size


def learning_rate_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """step -> learning rate, equal to automl's ``CosineLrSchedule`` & co. at every step.

    Quirk kept from automl: the cosine phase uses ``cos(pi * step / (total - warmup))`` with the
    *absolute* step, so it starts slightly below the peak right after warm-up.
    """
    adjusted_lr = train_cfg.learning_rate * train_cfg.batch_size / _DEFAULT_BATCH_SIZE
    warmup_init = train_cfg.lr_warmup_init
    per_epoch = steps_per_epoch(train_cfg)
    warmup_steps = int(train_cfg.lr_warmup_epochs * per_epoch)
    n_total = total_steps(train_cfg)
    kind = train_cfg.lr_schedule

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = warmup_init + step / max(warmup_steps, 1) * (adjusted_lr - warmup_init)
        if kind == "cosine":
            decay_steps = max(n_total - warmup_steps, 1)
            after = 0.5 * adjusted_lr * (1.0 + jnp.cos(math.pi * step / decay_steps))
        elif kind == "polynomial":
            frac = jnp.clip(1.0 - step / max(n_total, 1), 0.0, 1.0)
            after = adjusted_lr * frac**train_cfg.poly_lr_power
        elif kind == "stepwise":
            first = int(train_cfg.first_lr_drop_epoch * per_epoch)
            second = int(train_cfg.second_lr_drop_epoch * per_epoch)
            after = adjusted_lr * jnp.where(step < first, 1.0, jnp.where(step < second, 0.1, 0.01))
        elif kind == "constant":
            after = jnp.asarray(adjusted_lr, jnp.float32)
        else:
            raise ValueError(f"unknown lr_schedule {kind!r}")
        return jnp.where(step < warmup_steps, warmup, after)

    return schedule


def clip_per_tensor_then_global(max_norm: float) -> optax.GradientTransformation:
    """automl's clipping: each gradient to norm ``max_norm``, then all of them globally.

    ``max_norm <= 0`` disables clipping.
    """
    if max_norm <= 0:
        return optax.identity()

    def per_tensor(updates, state, params=None):
        del params

        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g)))
            # tf.clip_by_norm: scale only when the norm exceeds the limit.
            return g * (max_norm / jnp.maximum(norm, max_norm))

        return jax.tree.map(clip, updates), state

    return optax.chain(
        optax.GradientTransformation(lambda _: optax.EmptyState(), per_tensor),
        optax.clip_by_global_norm(max_norm),
    )


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Clipping followed by SGD with momentum (``accum = m*accum + g; p -= lr*accum``) or Adam.

    With ``train_cfg.freeze`` (a regex over ``/``-joined parameter paths) only the other
    parameters go through it: frozen ones get a zero update and have no optimizer state, and the
    global clipping norm is taken over the trained parameters only.
    """
    schedule = learning_rate_schedule(train_cfg)
    if train_cfg.optimizer == "sgd":
        base = optax.sgd(schedule, momentum=train_cfg.momentum or None)
    elif train_cfg.optimizer == "adam":
        base = optax.adam(schedule)
    else:
        raise ValueError(f"unknown optimizer {train_cfg.optimizer!r}")
    tx = optax.chain(clip_per_tensor_then_global(train_cfg.clip_gradients_norm), base)
    if not train_cfg.freeze:
        return tx
    return optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda params: jax.tree.map(
            lambda trained: "train" if trained else "frozen",
            trainable_mask(params, train_cfg.freeze),
        ),
    )


def count_trainable(params, freeze: str | None) -> tuple[int, int]:
    """(trained, total) parameter counts of ``params`` under the ``freeze`` regex."""
    mask = trainable_mask(params, freeze)
    sizes = jax.tree.map(lambda p: int(np.prod(p.shape)), params)
    total = sum(jax.tree.leaves(sizes))
    trained = sum(s for s, m in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask), strict=True) if m)
    return trained, total
