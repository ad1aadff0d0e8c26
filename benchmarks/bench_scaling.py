"""Data-parallel scaling of the EfficientDet train step on simulated devices, and its all-reduces.

Runs the ``jax_side`` train step (targets, loss, backward, BN update, SGD momentum) under
``jax.jit`` with the batch sharded over a 1-D ``data`` mesh (``NamedSharding(mesh, P('data'))``)
and parameters / optimizer state / BN statistics replicated, on 1 device and on ``--devices``
simulated CPU devices (``--xla_force_host_platform_device_count``), at the same global batch.
It reports the step time of each and the communication in the compiled HLO: the number of
``all-reduce`` ops (and their bytes) of the normal step, and of the same step with BN in
inference mode (running statistics), whose difference is what train-mode BN adds (the batch
mean / variance of each BN layer in the forward pass and their gradients in the backward pass,
over the global batch).

Simulated devices share this machine's cores, so the 8-device time shows the overhead of the
partitioned program, not a speed-up.

    .venv/bin/python benchmarks/bench_scaling.py --devices 8 --image-size 256 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import PeakRss, emit, pin_threads, timed  # noqa: E402


def count_collectives(hlo_text: str) -> dict:
    """Numbers (and f32-equivalent MiB) of all-reduce / all-gather / reduce-scatter /
    collective-permute / all-to-all ops in compiled HLO text (async ``-start`` counted once)."""
    out = {}
    for op in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all"):
        pattern = re.compile(rf"= (\([^)]*\)|[\w\[\],{{}}:]+) {op}(?:-start)?\(")
        count, elems = 0, 0
        for m in pattern.finditer(hlo_text):
            count += 1
            for dims in re.findall(r"\[([\d,]*)\]", m.group(1)):
                n = 1
                for d in filter(None, dims.split(",")):
                    n *= int(d)
                elems += n
        if count:
            out[op] = {"count": count, "mib": round(elems * 4 / 2**20, 2)}
    return out


def build_step(image_size: int, train_bn: bool):
    import jax_side

    model, anchors, num_classes = jax_side.build_efficientdet(
        "efficientdet-d0", image_size, {}
    )
    step, init_state = jax_side.make_detection_train_step(
        model, anchors, num_classes, train_bn=train_bn
    )
    return model, step, init_state, num_classes


def measure(devices: int, image_size: int, batch: int, warmup: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import jax_side
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    data = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    result: dict = {"devices": devices, "batch": batch, "image_size": image_size}
    for train_bn in (True, False):
        model, step, init_state, num_classes = build_step(image_size, train_bn)
        images = np.random.default_rng(0).standard_normal(
            (batch, image_size, image_size, 3), np.float32
        )
        boxes, classes = jax_side.synthetic_gt(batch, image_size, num_classes)
        variables = jax.jit(
            lambda x, model=model: model.init(jax.random.key(0), x, train=False),
            out_shardings=replicated,
        )(jnp.zeros((1, image_size, image_size, 3)))
        state = jax.device_put(init_state(variables), replicated)
        args = [jax.device_put(a, data) for a in (images, boxes, classes)]
        jstep = jax.jit(step, in_shardings=(replicated, data, data, data),
                        out_shardings=(replicated, replicated), donate_argnums=0)
        t0 = time.perf_counter()
        compiled = jstep.lower(state, *args).compile()
        compile_s = time.perf_counter() - t0
        key = "train_bn" if train_bn else "frozen_bn"
        result[f"{key}_collectives"] = count_collectives(compiled.as_text())
        if not train_bn:
            continue
        result["compile_s"] = round(compile_s, 1)
        holder = {"state": state}

        def fn(compiled=compiled, holder=holder, args=args):
            holder["state"], loss = compiled(holder["state"], *args)
            loss.block_until_ready()

        fn()
        with PeakRss() as peak:
            result.update(timed(fn, warmup, repeats))
        result["peak_rss_steady_mb"] = round(peak.peak_mb)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help="internal: run one device count in this process")
    args = parser.parse_args()

    if args.case:
        case = json.loads(args.case)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={case['devices']}"
        )
        pin_threads(args.threads)
        emit(measure(case["devices"], args.image_size, args.batch, args.warmup, args.repeats))
        return

    results = []
    for devices in (1, args.devices):
        r = _run_self(devices, args)
        results.append(r)
        print(json.dumps(r), flush=True)
    print()
    print("| devices | global batch | step ms, median (min-max) | all-reduces (train BN) | "
          "all-reduce MiB | all-reduces (BN frozen) | load |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['devices']} | - | error | | | | |")
            continue
        tb = r["train_bn_collectives"].get("all-reduce", {"count": 0, "mib": 0})
        fb = r["frozen_bn_collectives"].get("all-reduce", {"count": 0, "mib": 0})
        print(f"| {r['devices']} | {r['batch']} | {r['median_ms']:.0f} ({r['min_ms']:.0f}-"
              f"{r['max_ms']:.0f}) | {tb['count']} | {tb['mib']} | {fb['count']} | "
              f"{r.get('load_before', '-')} |")


def _run_self(devices: int, args: argparse.Namespace) -> dict:
    """This script with ``--case`` in a fresh process (the device count is fixed at start)."""
    import subprocess

    from common import JAX_PYTHON, MALLOC_ENV, RESULT_PREFIX

    env = {**os.environ, **MALLOC_ENV["cached"]}
    env.pop("XLA_FLAGS", None)
    cmd = [str(JAX_PYTHON), __file__, "--case", json.dumps({"devices": devices}),
           "--image-size", str(args.image_size), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        return {"devices": devices, "error": proc.stderr[-2000:]}
    r = json.loads(lines[-1][len(RESULT_PREFIX):])
    r["load_before"] = round(load, 2)
    return r


if __name__ == "__main__":
    main()
