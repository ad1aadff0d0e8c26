"""Checkpoint saves on the CPU backend: one replica copies each array to the host."""

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effdet_jax.train import checkpointing


def test_cpu_saves_skip_replica_parallel_slicing_and_round_trip(tmp_path):
    """Orbax's replica-parallel save compiles a slicing program per array shape at the first save,
    which on simulated CPU devices costs tens of seconds for a model's few hundred arrays; the
    manager turns it off on CPU. The replicated and sharded arrays read back bit for bit."""
    manager = checkpointing.make_manager(str(tmp_path), checkpointing.CheckpointOptions(1, 2, 0))
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    assert handler._use_replica_parallel is False

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    n = len(jax.devices())
    state = {
        "replicated": jax.device_put(rng.normal(size=(5, 3)).astype(np.float32), NamedSharding(mesh, P())),
        "sharded": jax.device_put(rng.normal(size=(2 * n, 4)).astype(np.float32),
                                  NamedSharding(mesh, P("data"))),
    }
    assert checkpointing.save(manager, state, 1, force=True)
    manager.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, step = checkpointing.restore_latest(manager, abstract)
    assert step == 1
    for key in state:
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(state[key]))
        assert restored[key].sharding == state[key].sharding
