"""The stacked parameter layout of repeated blocks, and the one mapping to and from the unrolled one.

Identical repeated blocks run as one scanned module (``nn.scan``) whose variables carry a leading
axis over the repeats. Which blocks are stacked:

- EfficientNet: in each stage, the blocks after the first (same shapes; only the drop-connect rate
  differs, a scan input). The first block of a stage stays ``block_{i}`` (flat index ``i``); the
  rest are ``blocks_{a}_to_{b}`` (flat indices ``a..b``, inclusive), every leaf ``[b - a + 1, ...]``.
- EfficientDet: the BiFPN cells after the first (cell 0 holds the resample convs of the backbone's
  features): ``fpn_cells_1_to_{N-1}`` instead of ``fpn_cell_1`` .. ``fpn_cell_{N-1}``.
- EfficientDet heads (``class_net``, ``box_net``): all ``R`` repeats, ``repeats_0_to_{R-1}``. Its
  members are the stacked pieces of the unrolled modules: ``conv`` holds ``conv_0`` .. ``conv_{R-1}``
  (the separable conv the levels share), ``bn_p{l}`` holds ``bn_0_p{l}`` .. ``bn_{R-1}_p{l}``.

The converters' name tables, the summary and the old-checkpoint check speak of the unrolled layout
(``block_{i}`` for every block, ``fpn_cell_{c}`` for every cell, ``conv_{r}`` and ``bn_{r}_p{l}``
in the heads); ``to_stacked`` / ``to_unrolled``
map a variable tree (``{"params": ..., "batch_stats": ...}``, leaves numpy / jax arrays or
``jax.ShapeDtypeStruct``) between the two. A stacked name says how many repeats it holds (``stack_length``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import linen as nn

_STACKED = re.compile(r"^(blocks|fpn_cells|repeats)_(\d+)_to_(\d+)$")
# A stacked module's kind -> the name of one of its repeats in the unrolled layout (``repeats``:
# per member, ``unrolled_member_name``).
_UNROLLED = {"blocks": "block_{}", "fpn_cells": "fpn_cell_{}"}
# The heads' scan body: the shared conv and level l's BN (``models/heads.HeadRepeat``).
HEAD_CONV = "conv"
_HEAD_BN = re.compile(r"^bn_p(\d+)$")


@dataclasses.dataclass(frozen=True)
class StackedGroup:
    """One scanned run of blocks: under ``parent`` (module path below the collection), the modules
    ``unrolled`` (in order) are the leading-axis entries of the module ``stacked`` or, with
    ``member`` set, of its child ``member`` (several groups then share ``stacked``)."""

    parent: tuple[str, ...]
    stacked: str
    unrolled: tuple[str, ...]
    member: str = ""


def stacked_block_name(first: int, last: int) -> str:
    """Name of the scanned module holding flat blocks ``first..last`` (inclusive)."""
    return f"blocks_{first}_to_{last}"


def stacked_cell_name(first: int, last: int) -> str:
    """Name of the scanned module holding BiFPN cells ``first..last`` (inclusive)."""
    return f"fpn_cells_{first}_to_{last}"


def stacked_head_name(first: int, last: int) -> str:
    """Name of the scanned module holding a head's repeats ``first..last`` (inclusive)."""
    return f"repeats_{first}_to_{last}"


def head_bn_name(level: int) -> str:
    """Name, inside the heads' scan body, of level ``level``'s BN."""
    return f"bn_p{level}"


def unrolled_member_name(member: str, repeat: int) -> str:
    """The unrolled name of repeat ``repeat`` of the head scan body's member ``member``:
    ``conv`` -> ``conv_{r}``, ``bn_p{l}`` -> ``bn_{r}_p{l}``."""
    if member == HEAD_CONV:
        return f"conv_{repeat}"
    match = _HEAD_BN.match(member)
    if match is None:
        raise ValueError(f"{member!r} is not a member of the heads' scan body")
    return f"bn_{repeat}_p{match[1]}"


def head_groups(repeats: int, min_level: int, max_level: int,
                parent: tuple[str, ...]) -> list[StackedGroup]:
    """The stacked runs of one prediction head under ``parent``: its conv and each level's BN,
    all members of ``repeats_0_to_{repeats-1}``."""
    if repeats < 1:
        return []
    stacked = stacked_head_name(0, repeats - 1)
    members = [HEAD_CONV] + [head_bn_name(lvl) for lvl in range(min_level, max_level + 1)]
    return [StackedGroup(parent, stacked, tuple(unrolled_member_name(m, r) for r in range(repeats)), m)
            for m in members]


def scan_unroll(length: int, unrolled: bool) -> int:
    """``lax.scan``'s ``unroll`` for a run of ``length``: 1 (a loop), or with ``unrolled`` one
    that leaves no loop (``unroll=1`` is a loop even for a single repeat, so at least 2)."""
    return max(length, 2) if unrolled else 1


def scanned_stack(body: type[nn.Module], kwargs: dict, length: int, train: bool, remat: bool,
                  unrolled: bool, name: str) -> nn.Module:
    """``length`` repeats of the scan body ``body(**kwargs, train=train)`` as one ``nn.scan`` over
    stacked variables (``params`` and ``batch_stats`` on a leading repeat axis, fresh ``params`` /
    ``dropout`` rngs per repeat), named ``name``; ``remat`` inside the scan; ``unrolled``: no loop
    after tracing (``scan_unroll``). Call it as ``module(carry, xs) -> (carry, None)``, ``xs``
    scanned over its leading axis. Create it inside the parent's compact ``__call__``."""
    scan = nn.scan(
        nn.remat(body, prevent_cse=False) if remat else body,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=0,
        length=length,
        unroll=scan_unroll(length, unrolled),
    )
    return scan(**kwargs, train=train, name=name)


def stack_length(name: str) -> int | None:
    """Number of repeats the module ``name`` stacks, or None when it is not a stacked module."""
    match = _STACKED.match(name)
    return None if match is None else int(match[3]) - int(match[2]) + 1


def is_stacked_path(path: Iterable[str]) -> bool:
    """Whether a variable path (e.g. ``("params", "backbone", "blocks_2_to_3", ...)``) lies inside
    a stacked module, whose leaves have the repeat axis first."""
    return any(stack_length(str(p)) is not None for p in path)


def stage_runs(blocks: list[dict]) -> list[tuple[int, int, int]]:
    """``(first, last, stage)`` flat block indices of each stage of ``expanded_blocks()``."""
    runs: list[list[int]] = []
    for i, blk in enumerate(blocks):
        if runs and blocks[runs[-1][0]]["stage"] == blk["stage"]:
            runs[-1][1] = i
        else:
            runs.append([i, i, blk["stage"]])
    return [tuple(r) for r in runs]


def backbone_groups(efficientnet_config: Any, parent: tuple[str, ...] = ()) -> list[StackedGroup]:
    """The stacked runs of an EfficientNet (``EfficientNetConfig``): each stage's blocks after its
    first, when there are any."""
    groups = []
    for first, last, _ in stage_runs(efficientnet_config.expanded_blocks()):
        if last > first:
            groups.append(StackedGroup(
                parent, stacked_block_name(first + 1, last),
                tuple(f"block_{i}" for i in range(first + 1, last + 1)),
            ))
    return groups


def model_groups(config: Any) -> list[StackedGroup]:
    """The stacked runs of a model config: an ``EfficientDetConfig`` (backbone under ``backbone``)
    or an ``EfficientNetConfig``."""
    if not hasattr(config, "backbone_config"):
        return backbone_groups(config)
    groups = backbone_groups(config.backbone_config(), ("backbone",))
    if config.fpn_cell_repeats > 1:
        last = config.fpn_cell_repeats - 1
        groups.append(StackedGroup((), stacked_cell_name(1, last),
                                   tuple(f"fpn_cell_{c}" for c in range(1, last + 1))))
    for net in ("class_net", "box_net"):
        groups += head_groups(config.box_class_repeats, config.min_level, config.max_level, (net,))
    return groups


def _stack(leaves: list[Any]) -> Any:
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
    if isinstance(leaves[0], jax.Array):
        return jax.numpy.stack(leaves)
    return np.stack([np.asarray(x) for x in leaves])


def _entry(leaf: Any, i: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
    return leaf[i]


def _at(tree: Mapping, path: tuple[str, ...]) -> Mapping | None:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree if isinstance(tree, Mapping) else None


def _replace(tree: Mapping, path: tuple[str, ...], new: dict) -> dict:
    if not path:
        return new
    out = dict(tree)
    out[path[0]] = _replace(tree[path[0]], path[1:], new)
    return out


def to_stacked(variables: Mapping, groups: list[StackedGroup]) -> dict:
    """The unrolled-layout tree ``variables`` (collections first) in the stacked layout.

    Each group's unrolled modules are stacked leaf by leaf into its stacked module; a collection or
    group the tree does not have is left as it is (so partial trees, e.g. ``params`` only, work).
    Raises ``ValueError`` when only some of a group's modules are present or their leaves differ.
    """
    out = dict(variables)
    for collection, tree in variables.items():
        for g in groups:
            parent = _at(tree, g.parent)
            if parent is None or not any(name in parent for name in g.unrolled):
                continue
            missing = [name for name in g.unrolled if name not in parent]
            if missing:
                raise ValueError(f"{collection}/{'/'.join(g.parent)}: {missing} absent, so "
                                 f"{g.stacked} cannot be stacked from {list(g.unrolled)}")
            entries = [parent[name] for name in g.unrolled]
            structures = {jax.tree.structure(e) for e in entries}
            if len(structures) != 1:
                raise ValueError(f"{collection}/{'/'.join(g.parent)}: {list(g.unrolled)} differ in "
                                 "structure and cannot be stacked")
            stacked = jax.tree.map(lambda *xs: _stack(list(xs)), *entries)
            new_parent = {k: v for k, v in parent.items() if k not in g.unrolled}
            if g.member:
                new_parent[g.stacked] = {**parent.get(g.stacked, {}), g.member: stacked}
            else:
                new_parent[g.stacked] = stacked
            tree = _replace(tree, g.parent, new_parent)
        out[collection] = tree
    return out


def to_unrolled(variables: Mapping, groups: list[StackedGroup]) -> dict:
    """The stacked-layout tree ``variables`` in the unrolled layout (inverse of ``to_stacked``)."""
    out = dict(variables)
    for collection, tree in variables.items():
        for g in groups:
            parent = _at(tree, g.parent)
            if parent is None or g.stacked not in parent:
                continue
            new_parent = {k: v for k, v in parent.items() if k != g.stacked}
            stacked = parent[g.stacked]
            if g.member:
                if g.member not in stacked:
                    continue
                rest = {k: v for k, v in stacked.items() if k != g.member}
                if rest:
                    new_parent[g.stacked] = rest
                stacked = stacked[g.member]
            for i, name in enumerate(g.unrolled):
                new_parent[name] = jax.tree.map(lambda x, i=i: _entry(x, i), stacked)
            tree = _replace(tree, g.parent, new_parent)
        out[collection] = tree
    return out


def unrolled_names(groups: list[StackedGroup]) -> dict[tuple[str, ...], str]:
    """``(*parent, unrolled module name)`` -> the stacked module that holds it: what tells a tree in
    the unrolled (pre-scan) layout apart."""
    return {(*g.parent, name): g.stacked for g in groups for name in g.unrolled}


def is_unrolled_layout(flat_paths: Iterable[tuple[str, ...]], groups: list[StackedGroup]) -> bool:
    """Whether variable paths (collection first, e.g. ``("params", "backbone", "block_2", ...)``)
    are in the unrolled layout: some path names a module that the stacked layout folds away."""
    names = unrolled_names(groups)
    for path in flat_paths:
        body = tuple(path[1:])
        for k in range(1, len(body) + 1):
            if body[:k] in names:
                return True
    return False


def unrolled_prefixes(stacked_paths: Iterable[str]) -> dict[str, str]:
    """For ``/``-joined variable paths of the stacked layout (any prefix: ``params/``,
    ``opt_state/0/mu/``, ...), ``{prefix/block_i/: prefix/blocks_a_to_b}`` for each block ``i`` a
    stacked module holds (``{prefix/conv_r/: prefix/repeats_a_to_b}`` and ``bn_r_p{l}`` for a
    head's): the paths an unrolled-layout tree has instead."""
    out = {}
    for path in stacked_paths:
        parts = path.split("/")
        for k, part in enumerate(parts):
            match = _STACKED.match(part)
            if match is None:
                continue
            if match[1] == "repeats" and k + 1 == len(parts):
                continue
            prefix = "/".join(parts[:k])
            for i in range(int(match[2]), int(match[3]) + 1):
                name = (unrolled_member_name(parts[k + 1], i) if match[1] == "repeats"
                        else _UNROLLED[match[1]].format(i))
                out[f"{prefix}/{name}/"] = f"{prefix}/{part}"
    return out
