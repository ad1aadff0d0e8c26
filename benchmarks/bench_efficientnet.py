"""EfficientNet-B0 on CPU (issue #2): effdet_jax vs timm ``tf_efficientnet_b0``, same run.

Forward (inference) and one training step (softmax cross-entropy, backward, BN update, SGD
momentum 0.9) at 224 px, batch 8, fp32, same thread count on both sides; timm in NCHW and in
channels_last. Each case runs in its own subprocess; figures are the median (min-max) of
``--repeats`` calls after warm-up; JAX compilation is excluded and reported separately.

    .venv/bin/python benchmarks/bench_efficientnet.py
    .venv/bin/python benchmarks/bench_efficientnet.py --out benchmarks/results/b0.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    JAX_PYTHON,
    MALLOC_ENV,
    TORCH_PYTHON,
    fmt_ms,
    machine_info,
    run_case,
    wait_for_low_load,
)

HERE = pathlib.Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-load", type=float, default=1.0)
    parser.add_argument("--load-timeout", type=float, default=300)
    parser.add_argument("--malloc", choices=sorted(MALLOC_ENV), default="cached")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()

    base = dict(batch=args.batch, image_size=args.image_size, warmup=args.warmup,
                repeats=args.repeats)
    results = []
    for mode in ("infer", "train"):
        variants = [
            ("timm NCHW", TORCH_PYTHON, "torch_side.py", {"model": "tf_efficientnet_b0"}),
            ("timm channels_last", TORCH_PYTHON, "torch_side.py",
             {"model": "tf_efficientnet_b0", "channels_last": True}),
            ("effdet_jax", JAX_PYTHON, "jax_side.py", {"model": "efficientnet-b0"}),
        ]
        for label, python, script, extra in variants:
            load = wait_for_low_load(args.max_load, args.load_timeout)
            case = {**base, **extra, "mode": mode}
            r = run_case(python, HERE / script, case, args.threads, env=MALLOC_ENV[args.malloc])
            r.update(label=label, load_wait_end=round(load, 2), malloc=args.malloc,
                     malloc_env=MALLOC_ENV[args.malloc])
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine_info(), "results": results}, indent=1))
    print()
    print(markdown_table(results))


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| case | implementation | ms / call, median (min-max) | images/s | vs timm channels_last "
        "| peak RSS (MiB) | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("infer", "train"):
        rows = [r for r in results if r["mode"] == mode]
        ref = next((r for r in rows if r.get("label") == "timm channels_last"), {})
        for r in rows:
            ratio = (f"{ref['median_ms'] / r['median_ms']:.2f}x"
                     if "median_ms" in r and "median_ms" in ref else "-")
            ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else "-"
            lines.append(
                f"| {mode} b{r['batch']} {r['image_size']} | {r['label']} | {fmt_ms(r)} | {ips} | "
                f"{ratio} | {r.get('peak_rss_steady_mb', '-')} | {r.get('load_before', '-')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
