"""Input pipeline: sources (synthetic shapes, tfds, COCO-json folders), transforms, batching.

Entry points: ``default_data_config`` / ``validate_data_config`` (``config.data``),
``make_train_pipeline`` / ``make_eval_pipeline`` (numpy batches, see ``pipeline.py``), and the
``LabelMap`` of the chosen dataset (``Pipeline.label_map``).

The pipeline names are imported on first use: they pull in TensorFlow (about 3 s and 0.5 GB),
which configs, validation and the train step do not need.
"""

import importlib
from typing import Any

from effdet_jax.data.config import default_data_config, validate_data_config
from effdet_jax.data.label_map import LabelMap

_PIPELINE_NAMES = (
    "Pipeline",
    "hide_gpus_from_tf",
    "make_eval_pipeline",
    "make_train_pipeline",
    "split_counts",
)

__all__ = ["LabelMap", "default_data_config", "validate_data_config", *_PIPELINE_NAMES]


def __getattr__(name: str) -> Any:
    if name in _PIPELINE_NAMES:
        return getattr(importlib.import_module("effdet_jax.data.pipeline"), name)
    raise AttributeError(f"module 'effdet_jax.data' has no attribute {name!r}")
