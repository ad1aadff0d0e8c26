"""Device mesh and sharding rules.

The mesh has two axes: ``data`` (the global batch is split along it) and ``model`` (large
parameters are split along their output-channel dimension). Optionally, FSDP-style, large arrays
are also split along ``data``. Every array of the train state gets its sharding from its *shape*
alone, so a parameter, its momentum and its EMA copy always agree.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from effdet_jax.models.layout import is_stacked_path

DATA = "data"
MODEL = "model"


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
    """(data, model) sizes for ``num_devices``; ``data=-1`` takes all remaining devices."""
    model = int(mesh_cfg.model)
    if model < 1 or num_devices % model:
        raise ValueError(f"model={model} must be >= 1 and divide the {num_devices} devices")
    data = num_devices // model if mesh_cfg.data == -1 else int(mesh_cfg.data)
    if data * model != num_devices:
        raise ValueError(
            f"data={mesh_cfg.data} x model={model} must equal the {num_devices} devices"
        )
    return data, model


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, model)`` mesh in Auto mode: GSPMD propagates shardings inside the jitted step."""
    devices = list(jax.devices() if devices is None else devices)
    data, model = mesh_shape(mesh_cfg, len(devices))
    grid = np.asarray(devices).reshape(data, model)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split along ``data``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def array_spec(shape: Sequence[int], mesh: Mesh, fsdp: bool, shard_min_size: int,
               stacked: bool = False) -> PartitionSpec:
    """Sharding of one state array from its shape.

    Arrays smaller than ``shard_min_size`` elements are replicated. Larger ones put the last dim
    (output channels for HWIO kernels) on ``model`` when divisible, and with ``fsdp`` the largest
    remaining divisible dim on ``data``. ``stacked``: the leading dim is the repeat axis of a
    scanned module (``models.layout``); it is never sharded, so each scan step reads whole slices
    and the rule for the rest is the unrolled layout's.
    """
    spec: list[str | None] = [None] * len(shape)
    if not shape or int(np.prod(shape[int(stacked):], dtype=np.int64)) < shard_min_size:
        return PartitionSpec(*spec)
    n_model, n_data = mesh.shape[MODEL], mesh.shape[DATA]
    if n_model > 1 and shape[-1] % n_model == 0 and not (stacked and len(shape) == 1):
        spec[-1] = MODEL
    if fsdp and n_data > 1:
        free = [i for i in range(int(stacked), len(shape))
                if spec[i] is None and shape[i] % n_data == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = DATA
    return PartitionSpec(*spec)


def state_shardings(abstract_state, mesh: Mesh, fsdp: bool = False, shard_min_size: int = 2**18):
    """A pytree of ``NamedSharding`` matching ``abstract_state`` (from ``jax.eval_shape``); leaves
    inside a stacked module (``models.layout.is_stacked_path``) never shard their repeat axis."""

    def leaf(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        return NamedSharding(
            mesh, array_spec(x.shape, mesh, fsdp, shard_min_size, is_stacked_path(names))
        )

    return jax.tree_util.tree_map_with_path(leaf, abstract_state)
