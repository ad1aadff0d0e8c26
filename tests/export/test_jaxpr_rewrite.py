"""The ONNX-only rewrites give the same values as the primitives they replace
(``effdet_jax.export.jaxpr_rewrite``), including the edge repetition that stands in for ``-inf``
padding in ``SAME`` max pooling, where the edges hold the largest values (the case a wrong
rule would get wrong)."""

import jax
import numpy as np
import pytest
from jax import lax

from effdet_jax.export.jaxpr_rewrite import for_onnx, max_pool_by_slices


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((0, 0), (1, 2), (0, 1), (0, 0))])
def test_max_pool_by_slices_matches_reduce_window(size, padding):
    rng = np.random.default_rng(size)
    x = rng.standard_normal((2, size, size + 1, 3)).astype(np.float32)
    x[:, -1] += 10.0  # the last row / first column hold the maxima the padded windows must keep
    x[:, :, 0] += 10.0
    window, strides = (1, 3, 3, 1), (1, 2, 2, 1)
    pads = lax.padtype_to_pads(x.shape, window, strides, padding) if isinstance(padding, str) else padding
    expected = lax.reduce_window(x, -np.inf, lax.max, window, strides, pads)
    got = max_pool_by_slices(x, window, strides, tuple(tuple(p) for p in pads))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_same_max_pool_on_a_symbolic_batch_has_no_pad():
    """jax2onnx lowers ``pad`` only with a constant output shape; the SAME form uses none."""
    spec = jax.ShapeDtypeStruct((jax.export.symbolic_shape("b")[0], 8, 8, 4), np.float32)
    jaxpr = jax.make_jaxpr(
        lambda x: max_pool_by_slices(x, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (0, 1), (0, 1), (0, 0))))(spec)
    names = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert "pad" not in names and "concatenate" in names


@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True])
def test_fully_unrolled_scans_leave_no_loop_and_other_scans_stay(reverse):
    """A scan marked fully unrolled (the model's layer stacks with ``layer_loop="unrolled"``)
    becomes straight-line code with lax.scan's values (carry passed through, a forwarded ``xs``
    output, constants); a rolled scan (the NMS loop) stays a scan."""
    k = np.arange(3.0, dtype=np.float32)

    def step(c, x):
        return (c[0] + x * k, c[1]), (c[0] * x, x)

    def fn(c, xs):
        carry, ys = lax.scan(step, c, xs, unroll=4, reverse=reverse)
        rolled = lax.scan(lambda a, x: (a + x, a), carry[0], xs)
        return carry, ys, rolled

    args = ((np.ones(3, np.float32), np.float32(2.0)), np.arange(12.0, dtype=np.float32).reshape(4, 3))
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), args)
    rewritten = for_onnx(fn, *specs)
    scans = [e for e in jax.make_jaxpr(rewritten)(*args).jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["unroll"] == 1
    jax.tree.map(np.testing.assert_array_equal, rewritten(*args), fn(*args))
