"""Multi-process start-up: ``jax.distributed.initialize`` only when the environment asks for it.

A laptop run has none of these variables and stays single-process. A cluster job sets either
``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (e.g. two processes on one
machine), or is a SLURM / Open MPI / Cloud TPU job that jax detects by itself.
"""

import os

import jax

_CLUSTER_HINTS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def maybe_initialize() -> bool:
    """Initialises jax.distributed when the environment says so; returns whether it did."""
    if jax.distributed.is_initialized():
        return False
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        return True
    if any(os.environ.get(k) for k in _CLUSTER_HINTS) and int(
        os.environ.get("SLURM_NTASKS", os.environ.get("OMPI_COMM_WORLD_SIZE", "2"))
    ) > 1:
        jax.distributed.initialize()
        return True
    return False
