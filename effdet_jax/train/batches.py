"""This process's share of each global batch: reading it from ``effdet_jax.data`` and moving it
between the host and the mesh.

Each process reads only its shard and its ``global_batch / process_count`` rows per step;
``host_batch_to_global`` turns those rows into global arrays sharded along ``data``, and
``gather_to_all`` brings sharded results back as every row on every process. Resuming at step
``s`` asks the pipeline for the batches from step ``s`` on, so a resumed run sees the same data as
an uninterrupted one.
"""

from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from effdet_jax import data
from effdet_jax.train.experiment import input_normalization


def per_process_batch(global_batch: int) -> int:
    """Rows of a ``global_batch`` that this process reads (``global_batch / process_count``)."""
    count = jax.process_count()
    if global_batch % count:
        raise ValueError(f"batch size {global_batch} is not divisible by {count} processes")
    return global_batch // count


def train_batches(
    config: ml_collections.ConfigDict, image_size: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """This process's training batches from ``start_step`` on; each keeps its ``counts`` (the
    batch's bad/altered-data counters, ``data.counts``) for the trainer to sum and log."""
    pipeline = data.make_train_pipeline(
        config.data,
        image_size,
        per_process_batch(config.train.batch_size),
        normalization=input_normalization(config.model),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_step=start_step,
    )
    yield from pipeline


def eval_pipeline(config: ml_collections.ConfigDict, image_size: int) -> data.Pipeline:
    """This process's eval batches (one pass, padded with ``image_id == -1`` rows)."""
    return data.make_eval_pipeline(
        config.data,
        image_size,
        per_process_batch(config.eval.batch_size),
        normalization=input_normalization(config.model),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def host_batch_to_global(
    batch: dict[str, Any], sharding: NamedSharding, keys: tuple[str, ...]
) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded along ``data`` (no host round-trip later).

    Each process passes its own ``[B / process_count, ...]`` slice; the global batch is their
    concatenation in process order.
    """
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
        for k in keys
    }


def gather_to_all(tree: Any) -> Any:
    """Per-process numpy rows (or batch-sharded global arrays) -> all rows on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
