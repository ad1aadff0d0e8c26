"""Fine-tuning helpers: freeze parameters by regex, and move a checkpoint onto a model with a new
class head (different ``num_classes``) while keeping everything else."""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import numpy as np
from flax import traverse_util


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def trainable_mask(params: Mapping, freeze: str | None) -> dict:
    """A pytree of bools shaped like ``params``: False for every parameter whose path (``/``-joined,
    e.g. ``backbone/block_3/expand_conv/kernel``) matches the regex ``freeze`` (``re.search``).

    Use it with ``optax.masked`` / ``optax.multi_transform`` so frozen parameters get no update.
    ``freeze=None`` or ``""`` trains everything. ``^backbone/`` freezes the backbone.
    """
    if not freeze:
        return jax.tree.map(lambda _: True, params)
    pattern = re.compile(freeze)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: pattern.search(_path_str(path)) is None, params
    )


def transfer_variables(source: Mapping, target: Mapping) -> tuple[dict, list[str]]:
    """Copy every variable of ``source`` into ``target`` where path and shape agree.

    ``target`` is a freshly initialised variable tree of the new model (e.g. with another
    ``num_classes``). Returns the merged tree and the paths kept from ``target`` (re-initialised),
    e.g. ``params/class_net/predict/pointwise/kernel`` when only the class count changed. Variables in
    ``source`` with no place in ``target`` are an error (a wrong checkpoint for this architecture).
    """
    flat_src = traverse_util.flatten_dict(dict(source))
    flat_tgt = traverse_util.flatten_dict(dict(target))
    unknown = sorted("/".join(p) for p in flat_src if p not in flat_tgt)
    if unknown:
        raise ValueError(f"source variables with no counterpart in the target model: {unknown[:20]}")
    out, reinitialised = {}, []
    for path, value in flat_tgt.items():
        src = flat_src.get(path)
        if src is not None and tuple(np.shape(src)) == tuple(np.shape(value)):
            out[path] = src
        else:
            out[path] = value
            reinitialised.append("/".join(path))
    return traverse_util.unflatten_dict(out), reinitialised
