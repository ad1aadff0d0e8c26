"""The heads' repeats as one ``nn.scan`` (``models/heads.py``, ``repeats_0_to_{R-1}``).

Reference: the pre-scan head, a Python loop over levels and repeats of ``conv_{r}`` (shared across
levels) and ``bn_{r}_p{l}`` modules (``_PerRepeatHead`` below, the forward this project had before
the scan, automl's ``ClassNet`` / ``BoxNet``), fed the same weights through ``layout.to_unrolled``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from effdet_jax import efficientdet
from effdet_jax.models.heads import PredictionHead, head_separable_conv
from effdet_jax.models.layers import activation_fn, batch_norm
from effdet_jax.models.layout import (
    head_groups,
    is_unrolled_layout,
    model_groups,
    to_stacked,
    to_unrolled,
    unrolled_prefixes,
)

LEVELS = (3, 4, 5)
FEATURES = 8


class _PerRepeatHead(nn.Module):
    """The pre-scan head. ``keep``: per (level, repeat) ``[batch]`` 0/1 drop-connect decisions for
    the residual branch (scaled by ``1 / keep_prob`` when kept); None keeps every branch unscaled."""

    repeats: int
    drop_connect_rate: float | None = None

    @nn.compact
    def __call__(self, feats, train=False, keep=None):
        act = activation_fn("swish")
        convs = [head_separable_conv(FEATURES, f"conv_{r}", jnp.float32) for r in range(self.repeats)]
        predict = head_separable_conv(9 * 3, "predict", jnp.float32)
        outputs = []
        for lvl in LEVELS:
            x = feats[lvl]
            for r in range(self.repeats):
                residual = x
                x = batch_norm(train, f"bn_{r}_p{lvl}", activation=act)(convs[r](x))
                if r > 0 and self.drop_connect_rate is not None:
                    if keep is not None:
                        mask = keep[(lvl, r)][:, None, None, None]
                        x = jnp.where(mask, x / (1.0 - self.drop_connect_rate), 0.0)
                    x = x + residual
            outputs.append(predict(x))
        return outputs


def _head(repeats, drop_connect_rate, **kw):
    return PredictionHead(num_outputs=3, num_anchors=9, features=FEATURES, repeats=repeats,
                          min_level=LEVELS[0], max_level=LEVELS[-1],
                          drop_connect_rate=drop_connect_rate, **kw)


def _feats(batch=4, seed=1):
    rng = np.random.default_rng(seed)
    return {lvl: jnp.asarray(rng.normal(size=(batch, 2 ** (7 - lvl), 2 ** (7 - lvl), FEATURES)),
                             jnp.float32) for lvl in LEVELS}


def _variables(head, feats):
    variables = head.init(jax.random.key(0), feats, train=False)
    # Non-trivial BN statistics and scales, so eval mode tests them too.
    return jax.tree.map(
        lambda v: v + 0.1 * jnp.abs(jnp.sin(jnp.arange(v.size, dtype=jnp.float32).reshape(v.shape))),
        variables)


def _run(module, variables, feats, train, **kw):
    """Outputs, BN statistics (train) and the gradient of a squared-output loss."""
    def loss(params):
        v = {**variables, "params": params}
        if train:
            out, updates = module.apply(v, feats, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": jax.random.key(1)}, **kw)
            stats = updates["batch_stats"]
        else:
            out, stats = module.apply(v, feats, train=False, **kw), None
        return sum(jnp.mean(o**2) for o in out), (out, stats)

    (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return out, stats, grads


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
@pytest.mark.parametrize("drop_connect_rate", [None, 0.0])
@pytest.mark.parametrize("train", [False, True])
def test_scanned_head_equals_the_per_repeat_head(train, drop_connect_rate, layer_loop):
    repeats = 3
    feats = _feats()
    head = _head(repeats, drop_connect_rate, unrolled=layer_loop == "unrolled")
    variables = _variables(head, feats)
    groups = head_groups(repeats, LEVELS[0], LEVELS[-1], ())
    ref_variables = to_unrolled(variables, groups)
    assert sorted(ref_variables["params"]) == sorted(
        ["predict"] + [f"conv_{r}" for r in range(repeats)]
        + [f"bn_{r}_p{lvl}" for r in range(repeats) for lvl in LEVELS])

    out, stats, grads = _run(head, variables, feats, train)
    ref_out, ref_stats, ref_grads = _run(_PerRepeatHead(repeats, drop_connect_rate), ref_variables,
                                         feats, train)
    assert [o.shape for o in out] == [(4, 2 ** (7 - lvl), 2 ** (7 - lvl), 27) for lvl in LEVELS]
    for o, r in zip(out, ref_out, strict=True):
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5)
    ref_grads = to_stacked({"params": ref_grads}, groups)["params"]
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    if train:
        ref_stats = to_stacked({"batch_stats": ref_stats}, groups)["batch_stats"]
        for s, r in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True):
            np.testing.assert_allclose(s, r, rtol=1e-5, atol=1e-6)


def test_head_drop_connect_drops_whole_examples_of_later_repeats():
    # Two repeats: only repeat 1's branch may drop, after its BN, so each (level, example) output is
    # the reference's with that branch kept (scaled 1 / keep_prob) or dropped (the residual alone).
    rate, batch = 0.5, 16
    feats = _feats(batch)
    head = _head(2, rate)
    variables = _variables(head, feats)
    ref_variables = to_unrolled(variables, head_groups(2, LEVELS[0], LEVELS[-1], ()))
    out, _ = head.apply(variables, feats, train=True, mutable=["batch_stats"],
                        rngs={"dropout": jax.random.key(3)})
    reference = _PerRepeatHead(2, rate)
    kept, dropped = (
        reference.apply(ref_variables, feats, train=True, mutable=["batch_stats"],
                        keep={(lvl, 1): jnp.full(batch, value) for lvl in LEVELS})[0]
        for value in (True, False))
    seen = set()
    for o, k, d in zip(out, kept, dropped, strict=True):
        for i in range(batch):
            is_kept = np.allclose(o[i], k[i], rtol=1e-5, atol=1e-5)
            is_dropped = np.allclose(o[i], d[i], rtol=1e-5, atol=1e-5)
            assert is_kept != is_dropped, i
            seen.add(is_kept)
    assert seen == {True, False}  # both outcomes among 48 draws at rate 0.5


@pytest.mark.parametrize("name", ["efficientdet-d0", "efficientdet-d7x"])
def test_head_mapping_round_trips_and_recognises_unrolled_heads(name):
    model = efficientdet(name, image_size=256)
    cfg = model.config
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False))
    groups = model_groups(cfg)
    levels = range(cfg.min_level, cfg.max_level + 1)
    repeats = cfg.box_class_repeats
    for net in ("class_net", "box_net"):
        stacked = shapes["params"][net][f"repeats_0_to_{repeats - 1}"]
        assert sorted(stacked) == sorted(["conv"] + [f"bn_p{lvl}" for lvl in levels])
        assert all(x.shape[0] == repeats for x in jax.tree.leaves(stacked))
    # A tree with stacked backbone / BiFPN and unrolled heads (this project's layout before the
    # heads' scan) is an unrolled layout, and stacks back exactly.
    heads_only = [g for g in groups if g.parent in (("class_net",), ("box_net",))]
    assert len(heads_only) == 2 * (1 + len(levels))
    rng = np.random.default_rng(0)
    values = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    old = to_unrolled(values, heads_only)
    assert any(k.startswith("blocks_") for k in old["params"]["backbone"])
    assert any(k.startswith("fpn_cells_") for k in old["params"])
    assert sorted(k for k in old["params"]["class_net"]) == sorted(
        ["predict"] + [f"conv_{r}" for r in range(repeats)]
        + [f"bn_{r}_p{lvl}" for r in range(repeats) for lvl in levels])
    box = values["params"]["box_net"][f"repeats_0_to_{repeats - 1}"]
    stats = values["batch_stats"]["class_net"][f"repeats_0_to_{repeats - 1}"]
    for r in range(repeats):
        np.testing.assert_array_equal(old["params"]["box_net"][f"conv_{r}"]["depthwise"]["kernel"],
                                      box["conv"]["depthwise"]["kernel"][r])
        np.testing.assert_array_equal(old["batch_stats"]["class_net"][f"bn_{r}_p{cfg.max_level}"]["var"],
                                      stats[f"bn_p{cfg.max_level}"]["var"][r])
    assert is_unrolled_layout(traverse_util.flatten_dict(old), groups)
    assert not is_unrolled_layout(traverse_util.flatten_dict(values), groups)
    back = to_stacked(old, groups)
    assert jax.tree.structure(back) == jax.tree.structure(values)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(values), strict=True):
        np.testing.assert_array_equal(x, y)
    # The checkpoint check's prefixes name every unrolled head module.
    stacked_paths = ["/".join(p) for p in traverse_util.flatten_dict(values)]
    prefixes = unrolled_prefixes(stacked_paths)
    for path in traverse_util.flatten_dict(old):
        if path[1] in ("class_net", "box_net") and path[2] != "predict":
            assert f"{path[0]}/{path[1]}/{path[2]}/" in prefixes, path
