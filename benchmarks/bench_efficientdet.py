"""EfficientDet on CPU, side by side: effdet_jax vs effdet (PyTorch), same run, same machine.

For each row the same batch, image size, fp32 and thread count on both sides; every case runs in
fresh subprocesses (``jax_side.py`` / ``torch_side.py``): ``--processes`` rounds, each running
both sides in turn, and reports the median, min and max of all ``--repeats`` x ``--processes``
timed calls after warm-up (JAX compilation excluded and reported separately), with each process's
median. Several processes because one process is one sample: the same code's small cases can
run at one of two speeds depending on the process (see RESULTS.md). Measured:
  * ``infer``: the network alone (``model.apply`` / ``EfficientDet.forward``), batch 1 and 8;
  * ``e2e``: network + post-processing (automl's default soft-NMS here; ``DetBenchPredict`` there);
  * ``train``: one training step (targets, loss, backward, BN update, SGD momentum) in images/s,
    batch 4 and 8, with the peak resident memory of the step (RSS sampled over 2 calls after the
    timed ones, and the whole process's peak including JAX compilation);
  * cost growth: D0 at 256 and D1 at 640.
The machine is shared: the 1-minute load average is checked before each case (``--max-load``) and
recorded with the results.

    .venv/bin/python benchmarks/bench_efficientdet.py --quick          # D0 512 headline rows
    .venv/bin/python benchmarks/bench_efficientdet.py --modes infer,e2e  # 6 rows: 30 min, 2 cores
    .venv/bin/python benchmarks/bench_efficientdet.py --out benchmarks/results/d0.json
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
    pool_processes,
    run_case,
    wait_for_low_load,
)

HERE = pathlib.Path(__file__).resolve().parent
TORCH_NAME = {"efficientdet-d0": "tf_efficientdet_d0", "efficientdet-d1": "tf_efficientdet_d1"}


def suite(quick: bool, rest_only: bool = False) -> list[dict]:
    """(model, mode, batch, image_size) rows; ``quick`` keeps the headline D0 512 rows,
    ``rest_only`` the others."""
    rows = [] if rest_only else [
        ("efficientdet-d0", "infer", 1, 512),
        ("efficientdet-d0", "e2e", 1, 512),
        ("efficientdet-d0", "train", 4, 512),
    ]
    if not quick:
        rows += [
            ("efficientdet-d0", "infer", 8, 512),
            ("efficientdet-d0", "e2e", 8, 512),
            ("efficientdet-d0", "train", 8, 512),
            ("efficientdet-d0", "infer", 1, 256),
            ("efficientdet-d0", "train", 4, 256),
            ("efficientdet-d1", "infer", 1, 640),
            ("efficientdet-d1", "train", 4, 640),
        ]
    return [dict(model=m, mode=mode, batch=b, image_size=s) for m, mode, b, s in rows]


# Extra JAX-only rows: the same case with model overrides (memory / speed trade-offs).
VARIANTS = {"remat": {"remat": "blocks"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D0 512 headline rows only")
    parser.add_argument("--rest", action="store_true", help="only the rows --quick leaves out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per process")
    parser.add_argument("--processes", type=int, default=3,
                        help="fresh processes per case and side (sides alternate per round)")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="wait until the 1-min load average is below this before each case")
    parser.add_argument("--load-timeout", type=float, default=300)
    parser.add_argument("--channels-last", action="store_true", help="also effdet channels_last")
    parser.add_argument("--malloc", choices=sorted(MALLOC_ENV), default="cached",
                        help="allocator for both sides (see common.MALLOC_ENV)")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="leave both sides' heaps in 4 KiB pages (benchmarks/huge_pages.py)")
    parser.add_argument("--modes", default="infer,e2e,train",
                        help="comma-separated modes to run (infer, e2e, train)")
    parser.add_argument("--variants", action="store_true",
                        help="also JAX train rows with remat (memory / speed trade-off)")
    parser.add_argument("--only", choices=["jax", "torch"], help="run one side")
    parser.add_argument("--out", type=pathlib.Path, help="write all results as JSON here")
    args = parser.parse_args()

    results = []
    modes = set(args.modes.split(","))
    for row in suite(args.quick, args.rest):
        if row["mode"] not in modes:
            continue
        row = {**row, "warmup": args.warmup, "repeats": args.repeats,
               "huge_pages": not args.no_huge_pages}
        variants = []
        if args.only != "jax":
            variants.append((TORCH_PYTHON, HERE / "torch_side.py",
                             {**row, "model": TORCH_NAME[row["model"]]}))
            if args.channels_last:
                variants.append((TORCH_PYTHON, HERE / "torch_side.py",
                                 {**row, "model": TORCH_NAME[row["model"]], "channels_last": True}))
        if args.only != "torch":
            variants.append((JAX_PYTHON, HERE / "jax_side.py", row))
            if row["mode"] == "train" and row["image_size"] == 512 and args.variants:
                for name, overrides in VARIANTS.items():
                    variants.append((JAX_PYTHON, HERE / "jax_side.py",
                                     {**row, "overrides": overrides, "variant": name}))
        runs: list[list[dict]] = [[] for _ in variants]
        for _ in range(args.processes):
            for (python, script, case), case_runs in zip(variants, runs, strict=True):
                load = wait_for_low_load(args.max_load, args.load_timeout)
                result = run_case(python, script, case, args.threads, env=MALLOC_ENV[args.malloc])
                result["load_wait_end"] = round(load, 2)
                case_runs.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "times_ms"}), flush=True)
        for case_runs in runs:
            result = pool_processes(case_runs)
            result["malloc"] = args.malloc
            result["malloc_env"] = MALLOC_ENV[args.malloc]
            results.append(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine_info(), "results": results}, indent=1))
    print()
    print(markdown_table(results))


def _key(r: dict) -> tuple:
    model = r["model"].replace("tf_", "").replace("_", "-")
    return (model, r["mode"], r["batch"], r["image_size"])


def markdown_table(results: list[dict]) -> str:
    """One line per (model, mode, batch, size): both sides' median (min-max) over all processes,
    the ratio, and each process's median."""
    rows: dict[tuple, dict] = {}
    for r in results:
        side = r.get("side", "jax" if r["model"].startswith("efficientdet") else "torch")
        if r.get("channels_last"):
            side = "torch_cl"
        if r.get("variant"):
            side = f"jax_{r['variant']}"
        rows.setdefault(_key(r), {})[side] = r
    lines = [
        "| model | case | batch | size | effdet ms | effdet_jax ms | speed-up | effdet img/s "
        "| effdet_jax img/s | peak RSS effdet / jax (MiB) | per-process medians effdet ; jax | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, mode, batch, size), sides in rows.items():
        t, j = sides.get("torch", {}), sides.get("jax", {})
        ok = "median_ms" in t and "median_ms" in j
        ratio = f"**{t['median_ms'] / j['median_ms']:.2f}x**" if ok else "-"
        ips = lambda r: f"{r['images_per_s']:.2f}" if "images_per_s" in r else "-"  # noqa: E731
        mem = (f"{t.get('peak_rss_steady_mb', '-')} / {j.get('peak_rss_steady_mb', '-')}"
               if mode == "train" else "-")
        loads = "/".join(f"{s.get('load_before', float('nan')):.1f}" for s in (t, j) if s)
        procs = " ; ".join(" ".join(f"{m:.0f}" for m in s.get("process_median_ms", [])) or "-"
                           for s in (t, j))
        lines.append(
            f"| {model} | {mode} | {batch} | {size} | {fmt_ms(t) if t else '-'} | "
            f"{fmt_ms(j) if j else '-'} | {ratio} | {ips(t)} | {ips(j)} | {mem} | {procs} | {loads} |"
        )
        for side, v in sides.items():
            if side.startswith("jax_") and "median_ms" in v:
                vr = f"{t['median_ms'] / v['median_ms']:.2f}x" if "median_ms" in t else "-"
                lines.append(
                    f"| {model} ({side[4:]}) | {mode} | {batch} | {size} | | {fmt_ms(v)} | {vr} "
                    f"| | {ips(v)} | - / {v.get('peak_rss_steady_mb', '-')} | - | "
                    f"{v.get('load_before', float('nan')):.1f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
