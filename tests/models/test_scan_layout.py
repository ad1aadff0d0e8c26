"""Each stage's repeated blocks as one ``nn.scan`` over stacked variables (``models/layout.py``).

References: the pre-scan network, one ``MBConvBlock`` module per block (``_UnrolledEfficientNet``
below, the forward this project had before the scan), fed the same weights through
``layout.to_unrolled``; automl's drop-connect schedule (block ``i`` of ``N``: ``rate * i / N``,
``efficientnet_model.py``); the unrolled layout's parameter counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from effdet_jax import efficientdet, efficientnet
from effdet_jax.models import efficientnet as efficientnet_module
from effdet_jax.models.efficientnet import MBConvBlock
from effdet_jax.models.layers import Conv2D, activation_fn, batch_norm
from effdet_jax.models.layout import (
    is_unrolled_layout,
    model_groups,
    stack_length,
    to_stacked,
    to_unrolled,
)


class _UnrolledEfficientNet(nn.Module):
    """The pre-scan EfficientNet feature extractor: a Python loop of ``block_{i}`` modules."""

    config: object

    @nn.compact
    def __call__(self, x, train=False):
        cfg = self.config
        act = activation_fn(cfg.activation)
        x = Conv2D(cfg.round_filters(cfg.stem_filters), kernel_size=3, strides=2, name="stem_conv")(x)
        x = batch_norm(train, "stem_bn", activation=act)(x)
        blocks = cfg.expanded_blocks()
        endpoints, stride = {}, 2
        for i, a in enumerate(blocks):
            if a["stride"] > 1:
                endpoints[stride] = x
                stride *= a["stride"]
            x = MBConvBlock(
                kernel=a["kernel"], stride=a["stride"], expand_ratio=a["expand_ratio"],
                filters_in=a["filters_in"], filters_out=a["filters_out"], se_ratio=a["se_ratio"],
                activation=cfg.activation, drop_rate=cfg.drop_connect_rate * i / len(blocks),
                drop_variant=cfg.drop_connect_variant, name=f"block_{i}",
            )(x, train)
        endpoints[stride] = x
        return endpoints


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["efficientdet-d0", "efficientdet-d3", "efficientdet-d7x"])
def test_mapping_round_trips_and_keeps_counts(name):
    model = efficientdet(name, image_size=128)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3)), train=False))
    groups = model_groups(model.config)
    unrolled = to_unrolled(shapes, groups)
    n_blocks = len(model.config.backbone_config().expanded_blocks())
    modules = {k for k in unrolled["params"]["backbone"] if k.startswith("block")}
    assert modules == {f"block_{i}" for i in range(n_blocks)}
    stacked_names = [k for k in shapes["params"]["backbone"] if stack_length(k)]
    assert stacked_names and sum(map(stack_length, stacked_names)) == n_blocks - len(
        [k for k in shapes["params"]["backbone"] if k.startswith("block_")])
    for collection in ("params", "batch_stats"):
        assert _size(unrolled[collection]) == _size(shapes[collection])
    flat_unrolled = traverse_util.flatten_dict(unrolled)
    assert is_unrolled_layout(flat_unrolled, groups)
    assert not is_unrolled_layout(traverse_util.flatten_dict(shapes), groups)
    back = to_stacked(unrolled, groups)
    assert jax.tree.structure(back) == jax.tree.structure(shapes)
    assert jax.tree.map(lambda x: x.shape, back) == jax.tree.map(lambda x: x.shape, shapes)
    # Concrete arrays: block_i of the unrolled tree is entry i - a of blocks_a_to_b.
    rng = np.random.default_rng(0)
    values = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    unrolled_values = to_unrolled(values, groups)
    for g in groups:
        first = int(g.stacked.split("_")[-3])
        if g.member:  # a head's conv_<r> / bn_<r>_p<l>: entry r of repeats_0_to_<R-1>/<member>
            leaf = ("pointwise", "kernel") if g.member == "conv" else ("scale",)
            expected = [f"conv_{r}" if g.member == "conv" else f"bn_{r}_{g.member[3:]}"
                        for r in range(len(g.unrolled))]
            assert list(g.unrolled) == expected
            stacked = (*g.parent, g.stacked, g.member)
        else:
            kind, leaf = (("block", ("depthwise_conv", "kernel")) if g.parent
                          else ("fpn_cell", ("node_0_bn", "scale")))
            assert list(g.unrolled) == [f"{kind}_{first + i}" for i in range(len(g.unrolled))]
            stacked = (*g.parent, g.stacked)
        for i, module in enumerate(g.unrolled):
            a = _get(unrolled_values["params"], (*g.parent, module, *leaf))
            b = _get(values["params"], (*stacked, *leaf))[i]
            np.testing.assert_array_equal(a, b)
    restacked = to_stacked(unrolled_values, groups)
    for x, y in zip(jax.tree.leaves(restacked), jax.tree.leaves(values), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("train", [False, True])
def test_scanned_backbone_equals_the_unrolled_network(train):
    # No drop-connect: the scan splits the dropout rng per repeat, the unrolled network per module.
    model = efficientnet("efficientnet-b0", features_only=True, drop_connect_rate=0.0)
    reference = _UnrolledEfficientNet(model.config)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 3)), jnp.float32)
    variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
    # Non-trivial BN statistics, so eval mode tests them too.
    variables = jax.tree.map(lambda v: v + 0.1 * jnp.abs(jnp.sin(jnp.arange(v.size).reshape(v.shape))),
                             variables)
    groups = model_groups(model.config)
    ref_variables = to_unrolled(variables, groups)

    def run(module, v):
        if train:
            out, updates = module.apply(v, x, train=True, mutable=["batch_stats"])
            return out, updates["batch_stats"]
        return module.apply(v, x, train=False), None

    out, stats = jax.jit(lambda v: run(model, v))(variables)
    ref_out, ref_stats = jax.jit(lambda v: run(reference, v))(ref_variables)
    assert set(out) == set(ref_out) == {2, 4, 8, 16, 32}
    for k in out:
        np.testing.assert_allclose(out[k], ref_out[k], rtol=1e-5, atol=1e-5)
    if train:
        ref_stacked = to_stacked({"batch_stats": ref_stats}, groups)["batch_stats"]
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stacked), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_each_scanned_block_drops_with_automls_rate(monkeypatch):
    """The rate each block is built with: a first block's ``drop_rate``, a scanned run's
    ``keep_probs`` (scan inputs); automl: ``drop_connect_rate * float(idx) / len(blocks)``."""
    rates = {}

    def first_block(next_fun, args, kwargs, context):
        module = context.module
        if type(module) is MBConvBlock and context.method_name == "__call__":
            rates[int(module.name.split("_")[1])] = np.float32(1.0 - module.drop_rate)
        return next_fun(*args, **kwargs)

    original = efficientnet_module.scanned_blocks

    def recording(block_kwargs, keep_probs, train, remat, unrolled, name):
        first = int(name.split("_")[1])
        rates.update({first + j: np.float32(p) for j, p in enumerate(keep_probs)})
        return original(block_kwargs, keep_probs, train, remat, unrolled, name)

    monkeypatch.setattr(efficientnet_module, "scanned_blocks", recording)
    model = efficientnet("efficientnet-b0", features_only=True, drop_connect_rate=0.2)
    x = jnp.zeros((2, 32, 32, 3))
    with nn.intercept_methods(first_block):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert sorted(rates) == list(range(16))
    assert [rates[i] for i in range(16)] == [np.float32(1.0 - 0.2 * i / 16) for i in range(16)]


@pytest.mark.parametrize("variant", ["sample", "channel", "element"])
def test_a_traced_keep_probability_drops_exactly_as_the_python_rate(variant):
    from effdet_jax.models.efficientnet import drop_connect
    from effdet_jax.models.layers import drop_weights

    x = jnp.asarray(np.random.default_rng(4).normal(size=(8, 4, 4, 16)), jnp.float32)
    rng, rate = jax.random.key(5), 0.2 * 13 / 16
    # The same entries dropped; the kept ones rescaled alike (XLA may divide by a constant as a
    # multiply by its reciprocal: 1 ulp).
    for fn in (lambda kp=None: drop_connect(x, rate, variant, rng, kp),
               lambda kp=None: drop_weights(x, rate, rng, kp)):
        want = jax.jit(fn)()
        got = jax.jit(fn)(np.float32(1.0 - rate))
        np.testing.assert_array_equal(got == 0, want == 0)
        np.testing.assert_allclose(got, want, rtol=2e-7)


def test_remat_inside_the_scan_gives_the_same_gradients():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
    kwargs = dict(features_only=True, width_coefficient=0.25, drop_connect_rate=0.0)
    plain = efficientnet("efficientnet-b0", **kwargs)
    remat = efficientnet("efficientnet-b0", remat=True, **kwargs)
    assert any(stack_length(k) and stack_length(k) > 1 for k in
               jax.eval_shape(lambda: plain.init(jax.random.key(0), x))["params"])
    variables = jax.jit(lambda: plain.init(jax.random.key(0), x))()

    def grads(model):
        def loss(params):
            out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                 train=True, mutable=["batch_stats"])
            return sum(jnp.mean(v**2) for v in out.values())

        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    (l0, g0), (l1, g1) = grads(plain), grads(remat)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_layer_loop_unrolled_runs_the_same_variables_to_the_same_outputs():
    kwargs = dict(num_classes=3, image_size=64, fpn_num_filters=16, fpn_cell_repeats=3,
                  box_class_repeats=2, max_level=5,
                  backbone_overrides={"width_coefficient": 0.25, "depth_coefficient": 0.5})
    scan = efficientdet("efficientdet-d0", **kwargs)
    unrolled = efficientdet("efficientdet-d0", layer_loop="unrolled", **kwargs)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 64, 64, 3)), jnp.float32)
    variables = jax.jit(lambda: scan.init(jax.random.key(0), x))()
    groups = model_groups(scan.config)
    assert "fpn_cells_1_to_2" in [g.stacked for g in groups]
    assert {g.stacked for g in groups if g.parent == ("box_net",)} == {"repeats_0_to_1"}
    assert jax.tree.structure(jax.eval_shape(lambda: unrolled.init(jax.random.key(0), x))) == \
        jax.tree.structure(variables)
    texts = {}
    for name, model in (("scan", scan), ("unrolled", unrolled)):
        fn = jax.jit(lambda v, m=model: m.apply(v, x, train=True, mutable=["batch_stats"]))
        texts[name] = fn.lower(variables).as_text()
        out = fn(variables)
        if name == "scan":
            ref = out
        else:
            for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # One loop per stacked module with scan (a head's groups share one), none unrolled.
    assert texts["scan"].count("stablehlo.while") == len({(g.parent, g.stacked) for g in groups})
    assert "stablehlo.while" not in texts["unrolled"]
