"""``config.model.remat``: recomputing activations in the backward pass changes memory, not numbers.

For each policy in ``model_config.REMAT_POLICIES`` the model of ``configs/tiny.py`` (with three
head repeats, so the heads' scan loops) computes the loss and gradient of the same batch in train
mode: the values equal the ``none`` policy's, and the compiled function's XLA temporaries are
smaller with ``blocks`` and smaller again with ``blocks+heads``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from train_helpers import max_abs_diff, tiny_config

from effdet_jax.models.model_config import REMAT_POLICIES
from effdet_jax.train import experiment


def _loss_and_grads(remat: str, variables, images):
    config = tiny_config()
    config.model.remat = remat
    config.model.overrides.cpu_kernels = "off"  # XLA's own ops: the quicker compile
    config.model.overrides.box_class_repeats = 3
    model = experiment.build_model(config.model)
    if variables is None:
        variables = model.init(jax.random.key(0), images, train=False)

    def loss(params, stats):
        (cls, box), updates = model.apply(
            {"params": params, "batch_stats": stats}, images, train=True, mutable=["batch_stats"],
        )
        total = sum(jnp.mean(c**2) for c in cls) + sum(jnp.mean(b**2) for b in box)
        return total, updates["batch_stats"]

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    compiled = fn.lower(variables["params"], variables["batch_stats"]).compile()
    (value, stats), grads = compiled(variables["params"], variables["batch_stats"])
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    return variables, jax.device_get((value, stats, grads)), temp_bytes


def test_remat_gives_the_same_gradients_with_less_memory():
    assert REMAT_POLICIES == ("none", "blocks", "blocks+heads")
    images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64, 64, 3)), jnp.float32)
    variables, results = None, {}
    for remat in REMAT_POLICIES:
        variables, outputs, temp = _loss_and_grads(remat, variables, images)
        results[remat] = (outputs, temp)
    (ref_loss, ref_stats, ref_grads), none_temp = results["none"]
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads)) > 0
    for remat in REMAT_POLICIES[1:]:
        loss, stats, grads = results[remat][0]
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        assert max_abs_diff(grads, ref_grads) < 1e-6, remat
        assert max_abs_diff(stats, ref_stats) < 1e-6, remat
    temps = {remat: results[remat][1] for remat in REMAT_POLICIES}
    # blocks+heads recomputes the heads' repeats too; the bars leave room for XLA's scheduling.
    assert temps["blocks"] < 0.6 * temps["none"], temps
    assert temps["blocks+heads"] < temps["blocks"], temps
