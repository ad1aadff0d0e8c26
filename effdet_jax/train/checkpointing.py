"""Orbax checkpoints of the train state: periodic async saves, keep last K and best-by-AP, resume.

A checkpoint at step ``s`` holds the whole ``TrainState`` (whose ``step`` is also the number of
global batches consumed, i.e. the input position) under ``state`` and a small JSON ``meta`` record.
Restoring targets carry the shardings of the current mesh, so a run can resume on another topology.

Resuming (``restore_latest``) checks before reading any array:

- the stored shapes against the model's (``CheckpointMismatchError`` names each variable path and
  both shapes: the checkpoint came from another architecture);
- then restores the newest step; a step that fails to read (a damaged or missing data file) is
  reported (step, file, variable, cause) and the next older step is tried. Once one is restored,
  the unreadable newer steps are moved to ``<checkpoints>_damaged/<step>`` (never deleted; out of
  the manager's sight, so the run can write those steps again). When none can be read,
  ``CheckpointRestoreError`` lists each step's cause and nothing is moved (a restart must not
  start from scratch beside them).
"""

import dataclasses
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

from effdet_jax.models.layout import unrolled_prefixes

BEST_METRIC = "AP"
# Where unreadable steps go, beside the checkpoint directory: ``<checkpoints>_damaged/<step>``.
DAMAGED_SUFFIX = "_damaged"
# Mismatching variables named in full in a ``CheckpointMismatchError``; the rest are counted.
MAX_LISTED = 12


class CheckpointMismatchError(ValueError):
    """A checkpoint's stored arrays do not fit the model built from the current config; the
    message names each differing variable path (``/``-joined) with both shapes."""


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of a directory could be read; the message lists each step's cause."""


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    every_steps: int
    keep: int
    keep_best: int = 1
    async_save: bool = True


def use_single_replica_saves_on_cpu() -> None:
    """On the CPU backend, saves copy each array to the host from one replica.

    Orbax's default (outside GPU) splits a replicated array over its replicas and copies each
    slice; that compiles a slicing program per array shape at the first save (608 arrays of the
    tiny model over 8 CPU devices: 35 s, then 0.8 s without), and CPU devices share one host
    memory, so the split buys nothing there. The files are the same either way. This sets
    orbax's global ``jax.Array`` handler, so it runs once, before the first manager is made.
    """
    if jax.default_backend() == "cpu":
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
        )


def make_manager(directory: str, options: CheckpointOptions) -> ocp.CheckpointManager:
    """A manager saving every ``every_steps`` (plus forced saves), keeping the last ``keep`` and
    the ``keep_best`` checkpoints with the highest ``AP`` metric."""
    use_single_replica_saves_on_cpu()
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
    # Handlers named up front so ``item_metadata`` can read the stored shapes before a restore.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=mgr_options, item_handlers=handlers
    )


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
    """(state, step) of the newest readable checkpoint, placed per ``abstract_state``'s
    shardings, or None when the directory holds no checkpoint.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set. Each
    unreadable step is reported; once an older one is restored, the unreadable newer ones are
    moved aside (module docstring). Raises ``CheckpointMismatchError`` when a readable step's
    shapes differ from ``abstract_state``'s, and ``CheckpointRestoreError`` (moving nothing) when
    no step can be read.
    """
    failed: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            stored = stored_shapes(manager, step)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read is reported, then skipped
            failed.append(_report(manager, step, "metadata: " + describe_failure(e)))
            continue
        check_shapes(stored, abstract_state, f"{manager.directory}/{step}")
        try:
            state = restore(manager, abstract_state, step)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            failed.append(_report(manager, step, describe_failure(e)))
            continue
        if failed:
            for bad_step, _ in failed:
                _set_aside(manager, bad_step)
            logging.warning("resuming from step %d, the newest readable checkpoint", step)
        return state, step
    if failed:
        raise CheckpointRestoreError(
            f"no checkpoint in {manager.directory} can be read (all are left in place):\n  "
            + "\n  ".join(line for _, line in failed)
        )
    return None


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


def path_name(path: tuple) -> str:
    """A pytree key path as ``/``-joined names (``params/backbone/stem/conv/kernel``)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of a pytree of arrays, ``ShapeDtypeStruct`` or orbax array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def stored_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of the state stored at ``step``, from its metadata (no array is read)."""
    metadata = manager.item_metadata(step)["state"]
    if metadata is None:
        raise FileNotFoundError(f"{manager.directory}/{step}/state: no readable metadata")
    return shapes_by_path(getattr(metadata, "tree", metadata))


def check_shapes(stored: dict[str, tuple[int, ...]], abstract_state: Any, where: str) -> None:
    """Raises ``CheckpointMismatchError`` naming every variable whose stored shape (or presence)
    differs from ``abstract_state``'s; ``where`` is the step directory
    (``WORKDIR/checkpoints/STEP``), whose workdir the message offers as ``init.checkpoint``."""
    wanted = shapes_by_path(abstract_state)
    lines = [
        f"{name}: checkpoint {stored[name]}, model {shape}"
        for name, shape in wanted.items()
        if name in stored and stored[name] != shape
    ]
    lines += [f"{name}: missing from the checkpoint, model {shape}"
              for name, shape in wanted.items() if name not in stored]
    lines += [f"{name}: checkpoint {shape}, not in the model"
              for name, shape in stored.items() if name not in wanted]
    if not lines:
        return
    workdir = os.path.dirname(os.path.dirname(where))
    _check_layout(stored, wanted, where, workdir)
    # The model's own variables first; opt_state/ and ema_*/ repeat them.
    lines.sort(key=lambda line: not line.startswith(("params/", "batch_stats/")))
    shown = lines[:MAX_LISTED]
    if len(lines) > MAX_LISTED:
        shown.append(f"... and {len(lines) - MAX_LISTED} more")
    raise CheckpointMismatchError(
        f"the checkpoint {where} does not fit the model of this config ({len(lines)} variables "
        "differ; it was written with another architecture):\n  " + "\n  ".join(shown) + "\n"
        f"Either train in a new --workdir, or start a new run from this checkpoint's weights: "
        f"--workdir=NEW_DIR --config.init.checkpoint={workdir}"
    )


def _check_layout(stored: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]], where: str,
                  workdir: str) -> None:
    """Raises ``CheckpointMismatchError`` when ``stored`` is the unrolled (pre-scan) layout of the
    stacked model ``wanted`` (``effdet_jax.models.layout``)."""
    prefixes = unrolled_prefixes(wanted)
    hits = sorted({stacked for name in stored if name not in wanted
                   for prefix, stacked in prefixes.items() if name.startswith(prefix)})
    if not hits:
        return
    hits = sorted({h.split("/", 1)[1] for h in hits if h.startswith("params/")}) or hits
    raise CheckpointMismatchError(
        f"the checkpoint {where} is in the pre-scan parameter layout: it stores each backbone "
        "block (block_<i>), BiFPN cell (fpn_cell_<c>) or head repeat (conv_<r>, bn_<r>_p<l>) on "
        "its own, while this version stacks repeated ones into one scanned module "
        f"({', '.join(hits[:4])}{', ...' if len(hits) > 4 else ''}). Its "
        "weights convert on loading: start a new run (or evaluate) from them with "
        f"--workdir=NEW_DIR --config.init.checkpoint={workdir} (the optimizer state and step "
        "count start fresh)"
    )


_READ_VARIABLE = re.compile(r'Error reading "([^"/]+)[^"]*"')
_READ_KEY = re.compile(r'Error reading "([^"]+)"')
_LOCAL_FILE = re.compile(r'local file "([^"]+)"')
# tensorstore names the file itself when the database's index (manifest, b-tree node) is bad.
_NAMED_FILE = re.compile(r'(?:of|decoding) local file "([^"]+)"')
_IN_DATABASE = re.compile(r' in OCDBT database at local file "[^"]+"')


def describe_failure(error: BaseException) -> str:
    """One line for a failed restore: the innermost cause's first line, and the variable and
    file it names (orbax wraps tensorstore's error in several layers of async exceptions)."""
    chain, seen = [], set()
    node: BaseException | None = error
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        chain.append(node)
        node = node.__cause__  # not __context__: what was being handled at the time is noise
    text = "\n".join(str(e) for e in chain)
    root = chain[-1]
    first_line = (str(root).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    cause = f"{type(root).__name__}: {_IN_DATABASE.sub('', first_line)}"
    details = []
    variable, database = _READ_VARIABLE.search(text), _LOCAL_FILE.search(text)
    if variable:
        details.append(f"variable {variable.group(1).replace('.', '/')}")
    if named := _NAMED_FILE.search(text):
        details.append(f"file {named.group(1)}")
    elif database:
        key = _READ_KEY.search(text)
        data_file = ocdbt_data_file(database.group(1), key.group(1)) if key else None
        details.append(f"file {data_file or database.group(1)}")
    return (", ".join(details) + ": " if details else "") + cause


def ocdbt_data_file(database: str, key: str) -> str | None:
    """The data file of an OCDBT ``database`` directory (orbax's array store) that holds
    ``key``'s value, e.g. ``.../state/ocdbt.process_0/d/0ad3...``; None where the value is
    inline or the index itself cannot be read."""
    import tensorstore as ts

    try:
        base = ts.KvStore.open(f"file://{os.path.abspath(database)}/").result()
        manifest = ts.ocdbt.dump(base).result()
        pending = [manifest["versions"][-1]["root"]["location"]]
        while pending:
            node = ts.ocdbt.dump(base, pending.pop()).result()
            for entry in node.get("entries", []):
                if entry.get("key") == key.encode() and "indirect_value" in entry:
                    # value:<prefix>:<path>:<offset>:<length>
                    location = entry["indirect_value"].removeprefix("value:").rsplit(":", 2)[0]
                    prefix, path = location.split(":", 1)
                    return os.path.join(database, prefix, path)
                pending += [
                    v["location"] for v in entry.values()
                    if isinstance(v, dict) and str(v.get("location", "")).startswith("btreenode::")
                ]
    except Exception:  # noqa: BLE001 - the lookup only refines a message
        return None
    return None


def _report(manager: ocp.CheckpointManager, step: int, cause: str) -> tuple[int, str]:
    """Logs why ``step`` cannot be restored; returns (step, the line)."""
    line = f"step {step} ({manager.directory}/{step}) cannot be restored: {cause}"
    logging.warning("checkpoint %s", line)
    return step, line


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
    """Moves the unreadable ``step`` to ``<checkpoints>_damaged/<step>`` (``.1``, ``.2``, ... if
    taken), out of the manager's sight, so the run can write that step again."""
    source = os.path.join(str(manager.directory), str(step))
    aside = os.path.join(str(manager.directory) + DAMAGED_SUFFIX, str(step))
    suffix = 0
    while os.path.exists(aside + (f".{suffix}" if suffix else "")):
        suffix += 1
    aside += f".{suffix}" if suffix else ""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"checkpoint {step} unreadable")
    if jax.process_index() == 0 and os.path.isdir(source):
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        os.rename(source, aside)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    manager.reload()
    logging.warning("checkpoint step %d moved to %s (kept, not deleted)", step, aside)
