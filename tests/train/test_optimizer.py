"""Learning-rate schedule, gradient clipping and EMA against automl's recipe.

References: the schedule's defining points (automl ``CosineLrSchedule``: linear warm-up from
``lr_warmup_init`` to ``lr * batch / 64``, then ``0.5 * lr * (1 + cos(pi * step / decay_steps))``),
TensorFlow's own ``clip_by_norm`` / ``clip_by_global_norm`` for the clipping that automl calls,
and the ``min(decay, (1 + t) / (10 + t))`` EMA warm-up of ``tf.train.ExponentialMovingAverage``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from effdet_jax.train import optimizer, train_step


def _train_cfg(**kw):
    cfg = default.get_config().train
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_schedule_matches_automl_recipe():
    cfg = _train_cfg(batch_size=128, num_examples_per_epoch=1280, num_epochs=10.0)
    sched = optimizer.learning_rate_schedule(cfg)
    peak = 0.08 * 128 / 64  # linear scaling per 64 images
    warmup = 10  # one epoch of 1280 images at batch 128
    assert optimizer.total_steps(cfg) == 100
    np.testing.assert_allclose(sched(0), 0.008, rtol=1e-6)  # warm-up init is not scaled
    np.testing.assert_allclose(sched(5), 0.008 + 0.5 * (peak - 0.008), rtol=1e-6)
    for step in (10, 37, 90):
        expected = 0.5 * peak * (1 + math.cos(math.pi * step / (100 - warmup)))
        np.testing.assert_allclose(sched(step), expected, rtol=1e-5)
    assert float(sched(90)) == pytest.approx(0.0, abs=1e-6)


def test_total_steps_override():
    cfg = _train_cfg(total_steps=7)
    assert optimizer.total_steps(cfg) == 7


def test_clipping_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    grads = {
        "a": rng.normal(size=(3, 4)).astype(np.float32) * 20,  # norm > 10: clipped alone
        "b": rng.normal(size=(5,)).astype(np.float32) * 3,  # norm < 10: kept alone
        "c": rng.normal(size=(2, 2, 3)).astype(np.float32) * 8,
    }
    tx = optimizer.clip_per_tensor_then_global(10.0)
    ours, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(grads))
    names = sorted(grads)
    per_tensor = [tf.clip_by_norm(grads[k], 10.0) for k in names]
    expected, _ = tf.clip_by_global_norm(per_tensor, 10.0)
    for k, e in zip(names, expected, strict=True):
        np.testing.assert_allclose(np.asarray(ours[k]), e.numpy(), rtol=1e-5, atol=1e-6)


def test_sgd_step_is_momentum_optimizer():
    """Two steps of SGD with momentum 0.9 at constant lr, without clipping (TF1 Momentum form)."""
    cfg = _train_cfg(lr_schedule="constant", lr_warmup_epochs=0.0, clip_gradients_norm=0.0,
                     batch_size=64)
    tx = optimizer.make_optimizer(cfg)
    w = jnp.ones((3,))
    g1, g2 = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 0.5, -1.0])
    state = tx.init(w)
    u1, state = tx.update(g1, state, w)
    u2, _ = tx.update(g2, state, w + u1)
    np.testing.assert_allclose(u1, -0.08 * g1, rtol=1e-6)
    np.testing.assert_allclose(u2, -0.08 * (0.9 * g1 + g2), rtol=1e-6)


def test_ema_decay_warmup():
    assert float(train_step.ema_decay(0.9998, 1)) == pytest.approx(2 / 11)
    assert float(train_step.ema_decay(0.9998, 100)) == pytest.approx(101 / 110)
    assert float(train_step.ema_decay(0.9998, 10**6)) == pytest.approx(0.9998)
    out = train_step.update_ema({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, jnp.float32(0.75))
    np.testing.assert_allclose(out["w"], [0.25, 0.25])
