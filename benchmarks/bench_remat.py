"""Memory of each ``model.remat`` policy: the compiled backward pass's XLA temporaries per config.

For each config and each policy of ``model_config.REMAT_POLICIES``, in a fresh process: the model
of ``configs/<name>.py`` (``image_size`` and ``batch`` as given, one device), ``jax.jit`` of
``jax.value_and_grad`` of a squared-output loss in train mode (BN statistics updated), compiled on
abstract inputs; reported: ``temp_mb`` (``compiled.memory_analysis().temp_size_in_bytes``, the
activations kept for the backward pass and the scratch buffers; parameters, gradients and
optimizer state are not in it) and ``compile_s``.

    .venv/bin/python benchmarks/bench_remat.py --configs d5,d6,d7,d7x --image-size 256 --batch 8

On CPU the model runs with its CPU kernels (``--cpu-kernels=auto``, as training does); with
``off`` XLA compiles the depthwise layers as grouped convolutions, whose backward pass takes it
far longer to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import config_compiled_from_scratch, emit, pin_threads, run_case  # noqa: E402


def measure(case: dict) -> dict:
    """One (config, policy) in this process."""
    pin_threads(int(os.environ.get("BENCH_THREADS", "2")))
    config = config_compiled_from_scratch(case["config"], case["image_size"], case["cpu_kernels"])
    import jax
    import jax.numpy as jnp

    from effdet_jax.train import experiment

    config.model.remat = case["remat"]
    model = experiment.build_model(config.model)
    size = case["image_size"]
    images = jax.ShapeDtypeStruct((case["batch"], size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)

    def loss(params, stats, x):
        (cls, box), updates = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                          mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
        return sum(jnp.mean(c**2) for c in cls) + sum(jnp.mean(b**2) for b in box), updates

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(
        variables["params"], variables["batch_stats"], images).compile()
    return {**case, "backend": jax.default_backend(), "compile_s": round(time.perf_counter() - t0, 1),
            "temp_mb": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)}


def main() -> None:
    from effdet_jax.models.model_config import REMAT_POLICIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help="internal: one case as JSON, run in this process")
    parser.add_argument("--configs", default="d5,d6,d7,d7x")
    parser.add_argument("--policies", default=",".join(REMAT_POLICIES))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--cpu-kernels", default="auto", choices=("auto", "off"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.case:
        emit(measure(json.loads(args.case)))
        return
    for name in args.configs.split(","):
        for remat in args.policies.split(","):
            case = {"config": name, "remat": remat, "image_size": args.image_size,
                    "batch": args.batch, "cpu_kernels": args.cpu_kernels}
            print(json.dumps(run_case(sys.executable, __file__, case, args.threads)), flush=True)


if __name__ == "__main__":
    main()
