"""Orbax checkpoints of the train state: periodic async saves, keep last K and best-by-AP, resume.

A checkpoint at step ``s`` holds the whole ``TrainState`` (whose ``step`` is also the number of
global batches consumed, i.e. the input position) under ``state`` and a small JSON ``meta`` record.
Restoring targets carry the shardings of the current mesh, so a run can resume on another topology.
"""

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

BEST_METRIC = "AP"


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    every_steps: int
    keep: int
    keep_best: int = 1
    async_save: bool = True


def make_manager(directory: str, options: CheckpointOptions) -> ocp.CheckpointManager:
    """A manager saving every ``every_steps`` (plus forced saves), keeping the last ``keep`` and
    the ``keep_best`` checkpoints with the highest ``AP`` metric."""
    preserve: list[cm.PreservationPolicy] = [cm.LatestN(n=options.keep)]
    if options.keep_best > 0:
        preserve.append(
            cm.BestN(
                get_metric_fn=lambda m: m[BEST_METRIC],
                n=options.keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    mgr_options = ocp.CheckpointManagerOptions(
        save_decision_policy=cm.FixedIntervalPolicy(options.every_steps),
        preservation_policy=cm.AnyPreservationPolicy(preserve),
        enable_async_checkpointing=options.async_save,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=mgr_options)


def save(
    manager: ocp.CheckpointManager,
    state: Any,
    step: int,
    metrics: dict[str, float] | None = None,
    force: bool = False,
) -> bool:
    """Saves (asynchronously) if the policy or ``force`` says so; returns whether it did.

    ``metrics`` also go into the ``meta`` record, so another run can pick the best step
    (``WORKDIR:best``) without this manager's in-memory metrics."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"step": int(step), **(metrics or {})}),
    )
    return manager.save(step, args=args, metrics=metrics, force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, int] | None:
    """(state, step) of the newest checkpoint, placed per ``abstract_state``'s shardings, or None.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set.
    """
    step = manager.latest_step()
    if step is None:
        return None
    return restore(manager, abstract_state, step), step


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int) -> Any:
    """The state saved at ``step``, placed per ``abstract_state``'s shardings."""
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return restored["state"]


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )
