"""Gradient accumulation and bfloat16 training, checked against what they are defined to be.

* ``grad_accum_steps=k``: one optimizer step on the mean of the k micro-batch gradients, each
  micro-batch seeing the BN statistics the previous one left (as k real forward passes would).
  The reference below computes that from the public pieces (``model.apply``, the loss, ``tx``).
* ``model.dtype=bfloat16``: computation in bfloat16, every piece of state float32, and a first step
  that agrees with the float32 one to bfloat16 precision.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from train_helpers import max_abs_diff, random_batch, tiny_config

from effdet_jax.train import batches, experiment
from effdet_jax.train import mesh as mesh_lib
from effdet_jax.train.train_step import TRAIN_KEYS


def _experiment(config):
    config.mesh.data, config.mesh.model = 1, 1
    return experiment.build_experiment(config, mesh=mesh_lib.make_mesh(config.mesh, jax.devices()[:1]))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[N, M]`` of yxyx boxes ``[N, 4]`` x ``[M, 4]`` in float64."""
    ih = np.maximum(0, np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]))
    iw = np.maximum(0, np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]))
    inter = ih * iw
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _anchor_batch(exp, batch_size: int, seed: int) -> dict:
    """A host batch whose gt boxes are distinct anchors of the model, so target assignment has no
    near-ties: every gt's best anchor is itself (IoU 1, the runner-up is checked to be far below)
    and no anchor's IoU sits within 1e-3 of the 0.5 threshold. Random boxes give exact real-number
    ties (anchors of one size inside a gt have equal IoU) that float32 rounding breaks differently
    in differently fused programs, which would make the comparison below test XLA's fusion choices
    instead of the accumulation.
    """
    host = random_batch(batch_size, exp.image_size, exp.config.model.num_classes, seed=seed)
    anchors = np.asarray(experiment.anchors_for(exp.model.config), np.float64)
    rng = np.random.default_rng(seed)
    num_gt = 4
    for b in range(batch_size):
        for _ in range(1000):  # draw until the picks have no near-tie anywhere
            picks = rng.choice(len(anchors), size=num_gt, replace=False)
            iou = _iou(anchors[picks], anchors)  # [gt, anchor]
            by_anchor = np.sort(iou, axis=0)
            if (np.all(np.sort(iou, axis=1)[:, -2] < 0.999) and np.all(np.abs(iou - 0.5) > 1e-3)
                    and np.all((by_anchor[-1] < 0.5) | (by_anchor[-1] - by_anchor[-2] > 1e-3))):
                break
        else:
            raise AssertionError("no tie-free gt set found")
        host["boxes"][b, :num_gt] = anchors[picks]
    return host


def _one_step(exp, seed=0, host=None):
    state = exp.init_state()
    init = jax.device_get(state)
    if host is None:
        host = random_batch(8, exp.image_size, exp.config.model.num_classes, seed=seed)
    with jax.set_mesh(exp.mesh):
        batch = batches.host_batch_to_global(host, exp.batch_sharding, TRAIN_KEYS)
        state, metrics = exp.train_step(state, batch)
    return init, host, jax.device_get(state), jax.device_get(metrics)


def test_grad_accumulation_is_the_mean_of_sequential_micro_batch_gradients():
    k = 2
    exp = _experiment(tiny_config(grad_accum_steps=k))
    init, host, state, metrics = _one_step(exp, host=_anchor_batch(exp, 8, seed=0))
    loss_fn = experiment.make_loss_fn(exp.model.config, exp.config.loss, exp.config.model.num_classes)
    rng = jax.random.fold_in(init.rng, 0)

    @jax.jit
    def micro(params, stats, batch, rng):
        def total(p):
            (cls, box), upd = exp.model.apply(
                {"params": p, "batch_stats": stats}, batch["images"], train=True,
                mutable=["batch_stats"], rngs={"dropout": rng},
            )
            loss, _ = loss_fn(cls, box, batch, p)
            return loss, upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(total, has_aux=True)(params)
        return loss, stats, grads

    stats, grads, losses = init.batch_stats, [], []
    for i in range(k):  # micro-batch i = rows i, i+k, ... (keeps a data-sharded batch in place)
        rows = {key: jnp.asarray(host[key][i::k]) for key in TRAIN_KEYS}
        loss, stats, g = micro(init.params, stats, rows, jax.random.fold_in(rng, i))
        losses.append(float(loss))
        grads.append(g)
    mean_grads = jax.tree.map(lambda *g: sum(g) / k, *grads)
    updates, _ = exp.tx.update(mean_grads, init.opt_state, init.params)
    expected = optax.apply_updates(init.params, updates)

    assert metrics["finite"] == 1.0
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-5)
    assert max_abs_diff(state.batch_stats, stats) < 1e-5
    assert max_abs_diff(state.params, expected) < 1e-6
    # ... and it is not just one big batch: the full-batch gradient gives other params.
    (_, _, full) = micro(init.params, init.batch_stats, {key: jnp.asarray(host[key]) for key in TRAIN_KEYS},
                         rng)
    full_updates, _ = exp.tx.update(full, init.opt_state, init.params)
    assert max_abs_diff(optax.apply_updates(init.params, full_updates), expected) > 1e-6


def _update(state, init) -> np.ndarray:
    """All parameter changes of a step as one flat vector."""
    return np.concatenate([np.ravel(a - b) for a, b in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(init.params), strict=True)])


def test_bfloat16_training_keeps_float32_state_and_matches_float32():
    config = tiny_config()
    config.model.dtype = "bfloat16"
    init16, _, state16, metrics16 = _one_step(_experiment(config))
    init32, _, state32, metrics32 = _one_step(_experiment(tiny_config()))

    for tree in (state16.params, state16.batch_stats, state16.ema_params, state16.ema_batch_stats,
                 state16.opt_state):
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype")}
        assert dtypes <= {np.dtype(np.float32), np.dtype(np.int32)}, dtypes
    assert max_abs_diff(init16.params, init32.params) == 0.0  # same initialisation
    assert metrics16["finite"] == 1.0
    # bfloat16 has an 8-bit mantissa: losses agree to ~1%, updates point the same way.
    np.testing.assert_allclose(metrics16["loss"], metrics32["loss"], rtol=0.03)
    d16, d32 = _update(state16, init16), _update(state32, init32)
    cosine = float(d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32)))
    assert cosine > 0.95, cosine
