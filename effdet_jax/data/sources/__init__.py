"""Data sources: the registry of ``config.data.source`` values and ``make_source``.

Layout: ``base`` defines the ``Source`` contract and the sharding helpers; each other module here
(``shapes``, ``coco_json``, ``tfds``) builds one kind of source and imports only ``base``.
``BUILDERS`` below is the one list of sources: config validation reads its keys, ``make_source``
dispatches on it. Builders are named as ``"module:function"`` and imported on first use, because
every source pulls in TensorFlow, which configs and validation do not need.

To add a source: a module here with a ``(config.data, split, process_index, process_count) ->
Source`` function, one entry in ``BUILDERS``, and its per-source checks (if any) in
``effdet_jax/data/config.py``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import ml_collections

if TYPE_CHECKING:
    from effdet_jax.data.sources.base import Source

# config.data.source -> "module of this package:builder function".
BUILDERS: dict[str, str] = {
    "shapes": "shapes:make_shapes_source",
    "tfds": "tfds:make_tfds_source",
    "coco_json": "coco_json:make_coco_json_source",
}
SOURCES: tuple[str, ...] = tuple(BUILDERS)
SPLITS: tuple[str, ...] = ("train", "eval")


def make_source(
    config: ml_collections.ConfigDict, split: str, process_index: int = 0, process_count: int = 1
) -> Source:
    """Build the source chosen by ``config.source`` (``config`` is ``config.data``)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {SPLITS}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in 0..{process_count - 1}")
    if config.source not in BUILDERS:
        raise ValueError(f"config.data.source={config.source!r}; allowed: {SOURCES}")
    module_name, function_name = BUILDERS[config.source].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, function_name)(config, split, process_index, process_count)
