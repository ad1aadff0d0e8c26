"""Compile cost of each config's train step: StableHLO size, lowering time, compile time, peak RSS.

What stands between a user and a big config is XLA compile time and memory. Each case runs in a
fresh process (no persistent compilation cache, nothing compiled before) on a one-device mesh: it
builds the config's experiment (``configs/<name>.py``, with ``image_size`` and ``batch`` as given),
lowers the jitted train step on abstract inputs (shape-only: no state is initialised), and compiles
it. Reported per case:

- ``lower_s``: tracing + lowering (Python and JAX side),
- ``stablehlo_lines`` / ``stablehlo_mb``: size of the lowered module's text,
- ``compile_s``: XLA's compile of that module (``compile_cpu_s``: its CPU time, all threads),
- ``max_rss_mb``: the process's peak resident set size (compilation included),
- with ``--steps N``: the compiled step's wall time on a real state and a synthetic batch
  (``step_median_ms`` / ``step_min_ms`` over N calls after 2 warm-up calls), so a compile option
  is judged by what it costs each step too.

``--cpu-preset`` sets ``config.xla_cpu_opt_preset`` (``effdet_jax/train/compile_options.py``).

    .venv/bin/python benchmarks/bench_compile.py --configs d0,d3 --image-size 512 --batch 8
    .venv/bin/python benchmarks/bench_compile.py --configs d7x --image-size 256 --batch 8 \
        --out benchmarks/results/compile_cpu.json
    .venv/bin/python benchmarks/bench_compile.py --configs d0 --cpu-preset default --steps 8

Compiling is CPU-bound: measure on an otherwise idle machine (the driver waits for a low load and
records the load before and after each case).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    JAX_PYTHON,
    config_compiled_from_scratch,
    emit,
    machine_info,
    max_rss_mb,
    pin_threads,
    run_case,
    timed,
    wait_for_low_load,
)


def measure(case: dict) -> dict:
    """One case in this process: build, lower, compile the config's train step."""
    pin_threads(int(os.environ.get("BENCH_THREADS", "2")))
    config = config_compiled_from_scratch(case["config"], case["image_size"],
                                          case.get("cpu_kernels", "auto"))
    import jax
    import numpy as np

    from effdet_jax.train import experiment
    from effdet_jax.train.config_validation import validate_config

    config.train.batch_size = case["batch"]
    if case.get("cpu_preset"):
        config.xla_cpu_opt_preset = case["cpu_preset"]
    config.mesh.data = 1
    validate_config(config, num_devices=1)
    exp = experiment.build_experiment(config)
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        exp.abstract_state, exp.state_shardings,
    )
    b, s, m = case["batch"], exp.image_size, config.data.max_instances_per_image
    batch = {
        "images": jax.ShapeDtypeStruct((b, s, s, 3), np.float32, sharding=exp.batch_sharding),
        "boxes": jax.ShapeDtypeStruct((b, m, 4), np.float32, sharding=exp.batch_sharding),
        "classes": jax.ShapeDtypeStruct((b, m), np.int32, sharding=exp.batch_sharding),
    }
    c0, t0 = time.process_time(), time.perf_counter()
    with jax.set_mesh(exp.mesh):
        lowered = exp.train_step.lower(state, batch)
    text = lowered.as_text()
    c1, t1 = time.process_time(), time.perf_counter()
    compiled = lowered.compile()
    c2, t2 = time.process_time(), time.perf_counter()
    step = time_steps(exp, compiled, case) if case.get("steps") else {}
    return {
        **case,
        "backend": jax.default_backend(),
        "lower_s": round(t1 - t0, 2),
        "stablehlo_lines": text.count("\n"),
        "stablehlo_mb": round(len(text) / 2**20, 2),
        "compile_s": round(t2 - t1, 2),
        # CPU time of all threads: less sensitive to other jobs on the machine than the wall time.
        "lower_cpu_s": round(c1 - c0, 2),
        "compile_cpu_s": round(c2 - c1, 2),
        "max_rss_mb": round(max_rss_mb()),
        **step,
    }


def time_steps(exp, compiled, case: dict) -> dict:
    """Wall time of ``case["steps"]`` calls of the ``compiled`` train step of ``exp`` on an
    initialised state and a synthetic batch (random images, 8 boxes per image)."""
    import jax
    import numpy as np
    from jax_side import synthetic_gt

    b, s = case["batch"], exp.image_size
    boxes, classes = synthetic_gt(b, s, exp.config.model.num_classes)
    m = exp.config.data.max_instances_per_image
    images = np.random.default_rng(0).normal(size=(b, s, s, 3)).astype(np.float32)
    batch = jax.device_put({"images": images, "boxes": boxes[:, :m], "classes": classes[:, :m]},
                           exp.batch_sharding)
    holder = {"state": exp.init(jax.random.PRNGKey(0))}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    stats = timed(call, warmup=2, repeats=case["steps"])
    return {"step_median_ms": round(stats["median_ms"], 1), "step_min_ms": round(stats["min_ms"], 1),
            "step_times_ms": stats["times_ms"]}


def main() -> None:
    from effdet_jax.train.compile_options import CPU_OPT_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help="internal: one case as JSON, run in this process")
    parser.add_argument("--configs", default="d0,d3")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cpu-kernels", default="auto", choices=("auto", "off"))
    parser.add_argument("--cpu-preset", choices=tuple(CPU_OPT_PRESETS),
                        help="config.xla_cpu_opt_preset (default: the config's)")
    parser.add_argument("--steps", type=int, default=0,
                        help="also time this many calls of the compiled step (0: compile only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", help="append the results (with machine facts) to this JSON file")
    args = parser.parse_args()
    if args.case:
        emit(measure(json.loads(args.case)))
        return
    results = []
    for name in args.configs.split(","):
        case = {"config": name, "image_size": args.image_size, "batch": args.batch,
                "cpu_kernels": args.cpu_kernels, "cpu_preset": args.cpu_preset,
                "steps": args.steps}
        wait_for_low_load(args.max_load, timeout_s=600)
        result = run_case(JAX_PYTHON, __file__, case, args.threads, timeout_s=args.timeout)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        record = {"machine": machine_info(), "results": results}
        existing = []
        if os.path.exists(args.out):
            with open(args.out) as f:
                existing = json.load(f)
        with open(args.out, "w") as f:
            json.dump(existing + [record], f, indent=1)


if __name__ == "__main__":
    main()
