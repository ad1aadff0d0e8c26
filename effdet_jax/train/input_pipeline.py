"""Glue between ``effdet_jax.data`` pipelines and the trainer: per-process batch sizes and the
resume position.

Each process reads only its shard and its ``global_batch / process_count`` rows per step; the
trainer turns them into global arrays (``experiment.host_batch_to_global``). Resuming at step ``s``
asks the pipeline for the batches from step ``s`` on, so a resumed run sees the same data as an
uninterrupted one.
"""

from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from effdet_jax import data
from effdet_jax.train import model_factory


def per_process_batch(global_batch: int) -> int:
    count = jax.process_count()
    if global_batch % count:
        raise ValueError(f"batch size {global_batch} is not divisible by {count} processes")
    return global_batch // count


def train_batches(
    config: ml_collections.ConfigDict, image_size: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """This process's training batches from ``start_step`` on (counts dropped)."""
    pipeline = data.make_train_pipeline(
        config.data,
        image_size,
        per_process_batch(config.train.batch_size),
        normalization=model_factory.input_normalization(config.model),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_step=start_step,
    )
    for batch in pipeline:
        yield data.split_counts(batch)[0]


def eval_pipeline(config: ml_collections.ConfigDict, image_size: int) -> data.Pipeline:
    """This process's eval batches (one pass, padded with ``image_id == -1`` rows)."""
    pipeline = data.make_eval_pipeline(
        config.data,
        image_size,
        per_process_batch(config.eval.batch_size),
        normalization=model_factory.input_normalization(config.model),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return pipeline
