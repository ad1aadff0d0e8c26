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
# config.data.source -> "module:function" that checks, in seconds and before any model is built,
# that the data of the asked splits is on disk. "shapes" is generated in code and needs none.
AVAILABILITY_CHECKS: dict[str, str] = {
    "tfds": "tfds:check_prepared",
    "coco_json": "coco_json:check_files",
}


class DataUnavailableError(RuntimeError):
    """The configured dataset is not there; the message names what is missing and the fixes."""


def coco_fixes(tfds_name: str = "coco/2017", data_dir: str | None = None) -> str:
    """The two ways to give a run COCO, as command-line fragments (for error messages)."""
    dd = data_dir or "DIR"
    return (
        "Either prepare the tfds dataset (downloads ~25 GB from images.cocodataset.org):\n"
        f"    tfds build {tfds_name} --data_dir={dd}\n"
        f"  and run with --config.data.source=tfds --config.data.tfds_data_dir={dd}\n"
        "or use the official COCO json files and image folders:\n"
        "    --config.data.source=coco_json\n"
        "    --config.data.train_annotations=COCO/annotations/instances_train2017.json"
        " --config.data.train_images=COCO/train2017\n"
        "    --config.data.eval_annotations=COCO/annotations/instances_val2017.json"
        " --config.data.eval_images=COCO/val2017\n"
        "(or --config.data.source=shapes for the built-in synthetic set)."
    )


def check_available(config: ml_collections.ConfigDict, splits: tuple[str, ...]) -> None:
    """Raise ``DataUnavailableError`` unless the data of ``splits`` (``"train"`` / ``"eval"``) of
    the source chosen by ``config.source`` is there (``config`` is ``config.data``)."""
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; allowed: {SPLITS}")
    if not splits or config.source not in AVAILABILITY_CHECKS:
        return
    module_name, function_name = AVAILABILITY_CHECKS[config.source].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    getattr(module, function_name)(config, splits)


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
