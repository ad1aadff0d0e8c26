"""Everything built from a config before the first step: mesh, model, optimizer, shardings, and
the jitted ``init`` / ``train_step`` / ``detect`` functions.

Kept apart from the loop (``trainer.py``) so tests and notebooks can build an experiment and call
its pieces directly. Nothing here touches the input pipeline or the filesystem.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from effdet_jax.train import eval_step, objective, optimizer
from effdet_jax.train import mesh as mesh_lib
from effdet_jax.train.model_factory import build_model
from effdet_jax.train.train_state import TrainState, create_train_state
from effdet_jax.train.train_step import TRAIN_KEYS, StepOptions, make_train_step

# ``init`` runs once, so its speed is irrelevant, but XLA's optimisation passes over the hundreds
# of threefry initialisers take minutes on a CPU (87 s vs 11 s for a thin D0): compile it at -O0.
INIT_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


@dataclasses.dataclass
class Experiment:
    """The built pieces of a run (see module docstring). ``state_shardings`` mirrors TrainState."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    init: Callable[[jax.Array], TrainState]
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    detect: Callable[[Any, jax.Array], dict]

    @property
    def model_config(self):
        return self.model.config

    @property
    def image_size(self) -> int:
        size = self.model.config.image_size
        return int(size if isinstance(size, int) else size[0])

    def init_state(self) -> TrainState:
        """A fresh, sharded train state from ``config.train.seed``."""
        return self.init(jax.random.PRNGKey(self.config.train.seed))

    def eval_variables(self, state: TrainState) -> dict:
        """The variables evaluation uses: the EMA copies unless ``eval.use_ema`` is off."""
        if self.config.eval.use_ema and self.config.train.ema_decay > 0:
            return {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
        return {"params": state.params, "batch_stats": state.batch_stats}


def build_experiment(
    config: ml_collections.ConfigDict,
    mesh: Mesh | None = None,
    model: Any = None,
) -> Experiment:
    """Builds the mesh (unless given), the model, and jits ``init``/``train_step``/``detect``.

    Nothing is compiled yet: the first call of each function compiles it.
    """
    mesh = mesh_lib.make_mesh(config.mesh) if mesh is None else mesh
    model = build_model(config.model) if model is None else model
    model_config = model.config
    image_size = model_config.image_size
    image_size = int(image_size if isinstance(image_size, int) else image_size[0])

    schedule = optimizer.learning_rate_schedule(config.train)
    tx = optimizer.make_optimizer(config.train)
    init_fn = functools.partial(create_train_state, model, tx, image_size=image_size)
    abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    state_sh = mesh_lib.state_shardings(
        abstract_state, mesh, fsdp=config.mesh.fsdp, shard_min_size=config.mesh.shard_min_size
    )
    batch_sh = mesh_lib.batch_sharding(mesh)
    repl = mesh_lib.replicated(mesh)

    step_fn = make_train_step(
        model,
        tx,
        objective.make_loss_fn(model_config, config.loss, config.model.num_classes),
        schedule,
        StepOptions(
            ema_decay=config.train.ema_decay,
            grad_accum_steps=config.train.grad_accum_steps,
        ),
    )
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_sh, {k: batch_sh for k in TRAIN_KEYS}),
        out_shardings=(state_sh, repl),
        donate_argnums=(0,),
    )
    detect_fn = eval_step.make_detect_fn(model, model_config, config.eval.postprocess)
    variables_sh = {"params": state_sh.params, "batch_stats": state_sh.batch_stats}
    detect = jax.jit(detect_fn, in_shardings=(variables_sh, batch_sh), out_shardings=batch_sh)
    return Experiment(
        config=config,
        mesh=mesh,
        model=model,
        tx=tx,
        schedule=schedule,
        abstract_state=abstract_state,
        state_shardings=state_sh,
        batch_sharding=batch_sh,
        init=jax.jit(init_fn, out_shardings=state_sh, compiler_options=INIT_COMPILER_OPTIONS),
        train_step=train_step,
        detect=detect,
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
