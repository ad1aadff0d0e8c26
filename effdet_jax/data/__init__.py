"""Input pipeline: sources (synthetic shapes, tfds, COCO-json folders), transforms, batching.

Entry points: ``default_data_config`` / ``validate_data_config`` (``config.data``),
``make_train_pipeline`` / ``make_eval_pipeline`` (numpy batches, see ``pipeline.py``), and the
``LabelMap`` of the chosen dataset (``Pipeline.label_map``).
"""

from effdet_jax.data.config import default_data_config, validate_data_config
from effdet_jax.data.label_map import LabelMap
from effdet_jax.data.pipeline import (
    Pipeline,
    hide_gpus_from_tf,
    make_eval_pipeline,
    make_train_pipeline,
    split_counts,
)

__all__ = [
    "LabelMap",
    "Pipeline",
    "default_data_config",
    "hide_gpus_from_tf",
    "make_eval_pipeline",
    "make_train_pipeline",
    "split_counts",
    "validate_data_config",
]
