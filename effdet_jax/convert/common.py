"""Shared machinery of the checkpoint converters: fill a flax variable tree from named source arrays,
checking shapes, and fail listing every unmapped source name and every missing target."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import traverse_util


class CheckpointMismatchError(ValueError):
    """The source checkpoint does not map one-to-one onto the model's variables."""


def torch_conv_to_hwio(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight ``[out, in, kh, kw]`` (depthwise ``[C, 1, kh, kw]``) -> HWIO
    (depthwise ``[kh, kw, 1, C]``)."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def fill_variables(
    target_shapes: Mapping,
    assignments: Mapping[tuple[str, ...], tuple[str, np.ndarray]],
    source_names: set[str] | list[str],
    ignored_sources: set[str] = frozenset(),
) -> dict:
    """Build a variable tree shaped like ``target_shapes`` from ``assignments``.

    Args:
      target_shapes: the model's variables (arrays or ``jax.ShapeDtypeStruct``), e.g. from
        ``jax.eval_shape(model.init, ...)``: ``{"params": ..., "batch_stats": ...}``.
      assignments: flat target path (collection first) -> (source name, array already laid out, or
        None when the source lacks that name).
      source_names: every name in the source checkpoint.
      ignored_sources: source names that have no counterpart on purpose (e.g. step counters).
    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays.
    Raises:
      CheckpointMismatchError: listing unmapped source names, missing targets and shape mismatches.
    """
    flat_target = traverse_util.flatten_dict(jax.tree.map(lambda x: x, dict(target_shapes)))
    problems = []
    missing = sorted("/".join(p) for p in flat_target if p not in assignments)
    used = {src for src, value in assignments.values() if value is not None}
    extra_targets = sorted("/".join(p) for p in assignments if p not in flat_target)
    unmapped = sorted(set(source_names) - used - set(ignored_sources))
    absent = sorted(
        f"{src} (for {'/'.join(path)})" for path, (src, value) in assignments.items() if value is None
    )
    if absent:
        problems.append(f"{len(absent)} expected name(s) absent from the checkpoint: {absent}")
    out = {}
    for path, (src, value) in assignments.items():
        if path not in flat_target or value is None:
            continue
        want = tuple(flat_target[path].shape)
        if tuple(value.shape) != want:
            problems.append(f"{src} -> {'/'.join(path)}: shape {tuple(value.shape)} != {want}")
            continue
        out[path] = np.asarray(value, dtype=np.float32)
    if missing:
        problems.append(f"{len(missing)} model variable(s) not found in the checkpoint: {missing}")
    if extra_targets:
        problems.append(f"mapped to variables the model does not have: {extra_targets}")
    if unmapped:
        problems.append(f"{len(unmapped)} checkpoint name(s) not used: {unmapped}")
    if problems:
        problems = [_truncate(p) for p in problems]
        raise CheckpointMismatchError("checkpoint does not match the model:\n- " + "\n- ".join(problems))
    return traverse_util.unflatten_dict(out)


def bn_assignments(
    prefix: tuple[str, ...], source: Mapping[str, np.ndarray], names: Mapping[str, str]
) -> dict:
    """Map one BatchNorm. ``names`` gives the source names of scale, bias, mean and var."""
    return {
        ("params", *prefix, "scale"): (names["scale"], source.get(names["scale"])),
        ("params", *prefix, "bias"): (names["bias"], source.get(names["bias"])),
        ("batch_stats", *prefix, "mean"): (names["mean"], source.get(names["mean"])),
        ("batch_stats", *prefix, "var"): (names["var"], source.get(names["var"])),
    }


def torch_bn_assignments(prefix: tuple[str, ...], source: Mapping, torch_name: str) -> dict:
    """A PyTorch ``BatchNorm2d`` (``weight``, ``bias``, ``running_mean``, ``running_var``)."""
    return bn_assignments(
        prefix,
        source,
        {
            "scale": f"{torch_name}.weight",
            "bias": f"{torch_name}.bias",
            "mean": f"{torch_name}.running_mean",
            "var": f"{torch_name}.running_var",
        },
    )


def _truncate(message: str, limit: int = 2000) -> str:
    return message if len(message) <= limit else message[:limit] + f" ... ({len(message)} chars)"
