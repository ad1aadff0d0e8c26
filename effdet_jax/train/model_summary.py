"""``main.py --mode=summary``: a config's parameter table, counts, multiply-adds and per-level
output shapes at full size, from shapes alone.

Imports neither TensorFlow nor the input pipeline (the trainer does), so the summary starts in
seconds.
"""

import jax
import ml_collections
import numpy as np
from clu import parameter_overview

from effdet_jax.summary import summarize
from effdet_jax.train import optimizer
from effdet_jax.train.config_validation import validate_config
from effdet_jax.train.experiment import build_experiment


def summary(config: ml_collections.ConfigDict) -> str:
    """Parameter table, counts and per-level output shapes at full size, via ``jax.eval_shape``
    only (nothing is compiled or allocated)."""
    validate_config(config)
    exp = build_experiment(config)
    state = exp.abstract_state
    table = parameter_overview.get_parameter_overview(state.params, include_stats=False)
    images = jax.ShapeDtypeStruct((1, exp.image_size, exp.image_size, 3), np.float32)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    cls_out, box_out = jax.eval_shape(
        lambda v, x: exp.model.apply(v, x, train=False), variables, images
    )
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    lines = [
        table,
        summarize(exp.model).format(),
        f"model {config.model.name}: {n_params:,} parameters, input {exp.image_size}px",
        "outputs per level (class, box): "
        + ", ".join(f"{c.shape[1:]}/{b.shape[-1]}" for c, b in zip(cls_out, box_out, strict=True)),
        f"train steps: {optimizer.total_steps(config.train)}, mesh {dict(exp.mesh.shape)}",
    ]
    return "\n".join(lines)
