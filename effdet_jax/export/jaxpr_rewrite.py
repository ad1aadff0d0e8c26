"""Re-emits a traced function with the constructs jax2onnx 0.17 mishandles rewritten into
equivalent primitives (same values), for the ONNX export only.

* nested ``jit`` calls and custom-derivative calls are inlined (the export is a forward pass):
  jax2onnx lowers a nested ``jit`` through ``jax._src.core.ClosedJaxpr``, which jax 0.11+ no
  longer has (``ClosedJaxpr`` merged into ``Jaxpr``);
* ``reduce_window_max`` (max pooling) becomes the maximum of its strided window slices:
  jax2onnx emits an ONNX ``MaxPool`` over all 4 dimensions of ``[batch, height, width,
  channels]``, which onnxruntime rejects ("Unsupported pooling size"). Max is exact, so the
  slices give the same values; ``SAME`` padding repeats the edges (see
  :func:`max_pool_by_slices`), so a symbolic batch converts too;
* a ``scan`` marked fully unrolled (``unroll >= length``: the layer stacks of a model with
  ``layer_loop="unrolled"``, as ``serving.plain_model`` builds it) becomes its body applied
  ``length`` times: jax2onnx writes every scan as an ONNX ``Loop``, which onnx2tf cannot convert.
  Other scans (the NMS loop) stay loops.

Control-flow bodies (``scan`` / ``while`` / ``cond``) are rewritten the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

# Calls whose body is their value in a forward pass (custom derivatives only matter for gradients).
_CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr")


def max_pool_by_slices(
    x: jax.Array,
    window_dimensions: tuple[int, ...],
    window_strides: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
) -> jax.Array:
    """``lax.reduce_window(x, -inf, lax.max, ...)`` (no dilation) as a maximum of slices.

    Where every padding is shorter than its window (TF ``SAME`` pooling), the edges are repeated
    instead of padding with ``-inf``: a window that holds padding positions also holds the edge
    element next to them, so its maximum is the same. Repeating is a concatenation, which
    jax2onnx converts with a symbolic batch dimension (its ``lax.pad`` lowering needs a constant
    output shape).
    """
    if all(lo < w and hi < w for (lo, hi), w in zip(padding, window_dimensions, strict=True)):
        x = _repeat_edges(x, padding)
    else:
        x = lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in padding])
    counts = [(n - w) // s + 1 for n, w, s in zip(x.shape, window_dimensions, window_strides,
                                                   strict=True)]
    result = None
    for offsets in itertools.product(*(range(w) for w in window_dimensions)):
        limits = [o + (c - 1) * s + 1 for o, c, s in zip(offsets, counts, window_strides, strict=True)]
        part = lax.slice(x, offsets, limits, window_strides)
        result = part if result is None else jnp.maximum(result, part)
    return result


def _repeat_edges(x: jax.Array, padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """``x`` with its first / last slice along each axis repeated ``lo`` / ``hi`` times."""
    for axis, (lo, hi) in enumerate(padding):
        if lo or hi:
            first = lax.slice_in_dim(x, 0, 1, axis=axis)
            last = lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)
            x = lax.concatenate([first] * lo + [x] + [last] * hi, axis)
    return x


def _rewrite_max_pool(eqn: Any, invals: list[Any]) -> list[Any] | None:
    params = eqn.params
    dilated = any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"]))
    if dilated or not jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating):
        return None
    return [max_pool_by_slices(invals[0], tuple(params["window_dimensions"]),
                               tuple(params["window_strides"]), tuple(params["padding"]))]


def _is_unrolled_scan(eqn: Any) -> bool:
    if eqn.primitive.name != "scan":
        return False
    unroll = eqn.params["unroll"]
    return unroll is True or (not isinstance(unroll, bool) and unroll >= eqn.params["length"])


def _step_slice(x: Any, i: int) -> Any:
    """Step ``i`` of a scanned operand: a constant (the stacked weights of a layer stack) is
    sliced here, so each unrolled layer holds its own weights as a plain constant, as an unscanned
    model does, rather than a slice of a stacked constant; a traced value with ``index_in_dim``."""
    if isinstance(x, jax.core.Tracer):
        return lax.index_in_dim(x, i, keepdims=False)
    return np.asarray(x)[i]


def _unroll_scan(eqn: Any, invals: list[Any]) -> list[Any]:
    """A ``scan`` as its body applied once per step: ``consts, carry, xs -> carry, ys`` (the
    operand and result groups as ``lax``'s own ``_scan_impl`` reads them)."""
    params = eqn.params
    body, length = params["jaxpr"], params["length"]
    consts, carry, xs = (list(g) for g in params["ft_in"].update(invals).unpack())
    ys: list[list[Any]] = [[] for _ in range(length)]
    for i in (reversed(range(length)) if params["reverse"] else range(length)):
        outs = _eval(body.jaxpr, body.consts, [*consts, *carry, *(_step_slice(x, i) for x in xs)])
        carry, ys[i] = (list(g) for g in params["ft_out"].update(outs).unpack())
    return [*carry, *(jnp.stack(step) for step in zip(*ys, strict=True))]


def _rewrite_body(body: Any) -> Any:
    """A control-flow body (a closed jaxpr) with the rewrites applied, same inputs and outputs."""
    specs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type)
             for v in body.jaxpr.invars]
    return jax.make_jaxpr(lambda *a: _eval(body.jaxpr, body.consts, a))(*specs)


def _rewrite_param(value: Any) -> Any:
    if isinstance(value, jcore.ClosedJaxpr):
        return _rewrite_body(value)
    if isinstance(value, tuple) and value and all(isinstance(v, jcore.ClosedJaxpr) for v in value):
        return tuple(_rewrite_body(v) for v in value)
    return value


def _eval(jaxpr: Any, consts: Any, args: Any) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        outs = None
        if eqn.primitive.name in _CALL_PRIMITIVES:
            sub = next(eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params)
            outs = _eval(sub.jaxpr, sub.consts, invals)
        elif eqn.primitive.name == "reduce_window_max":
            outs = _rewrite_max_pool(eqn, invals)
        elif _is_unrolled_scan(eqn):
            outs = _unroll_scan(eqn, invals)
        if outs is None:
            params = {k: _rewrite_param(v) for k, v in eqn.params.items()}
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for var, val in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, jcore.DropVar):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


def for_onnx(fn: Callable[..., Any], *specs: jax.ShapeDtypeStruct) -> Callable[..., Any]:
    """``fn`` traced at ``specs`` now, re-emitted with the rewrites above when called.

    Tracing here, before jax2onnx runs, keeps its temporary patches of ``jnp`` / ``lax``
    functions (some without batching rules, e.g. its ``fori_loop``) out of the traced program,
    and keeps the jaxpr out of jit's trace cache for later plain jax calls.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*specs)
    out_tree = jax.tree.structure(out_shape)

    def rewritten(*args):
        outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(out_tree, outs)

    return rewritten
