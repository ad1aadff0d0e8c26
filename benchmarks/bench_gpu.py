"""EfficientDet-D0 on one GPU: effdet_jax vs effdet (PyTorch), fp32 and bfloat16, one script.

Run on the accelerator machine, once per side (each side in its own process, so neither holds the
other's GPU memory)::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/bench_gpu.py --side jax --out jax.json
    python benchmarks/bench_gpu.py --side torch --out torch.json
    python benchmarks/bench_gpu.py --table jax.json torch.json    # markdown rows for RESULTS.md

Cases (D0 at 512 unless ``--image-size``): ``infer`` (network only) at batch 1 and 8, ``e2e``
(network + post-processing: automl's global soft-NMS here, ``DetBenchPredict``'s per-class NMS
there) at batch 1 and 8, ``train`` (targets, focal + Huber loss, backward, BN update, SGD momentum:
the same step as ``jax_side.py`` / ``torch_side.py``) at batch 4 and 8. ``bf16`` rows: our
``dtype="bfloat16"`` model config (float32 params, BN statistics and loss); PyTorch
``torch.autocast(dtype=torch.bfloat16)``. Every figure is the median, min and max of ``--repeats``
synchronised calls after warm-up; JAX compilation is excluded and reported (``compile_s``).
Memory: JAX reports the compiled executable's footprint (arguments + outputs + XLA temporaries,
``memory_analysis``) and PyTorch ``torch.cuda.max_memory_allocated`` over the case.

Results are written after every case, so a run cut short keeps what it measured; ``--budget-s``
skips the remaining cases once exceeded.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from common import timed  # noqa: E402

CASES = [  # (mode, batch, dtype)
    ("e2e", 1, "float32"),
    ("e2e", 8, "float32"),
    ("infer", 1, "float32"),
    ("infer", 8, "float32"),
    ("train", 4, "float32"),
    ("train", 8, "float32"),
    ("e2e", 1, "bfloat16"),
    ("e2e", 8, "bfloat16"),
    ("train", 8, "bfloat16"),
]


def selected_cases(args) -> list[tuple[str, int, str]]:
    """``CASES`` narrowed by ``--dtype`` and ``--cases`` (``mode:batch:dtype`` items)."""
    wanted = None if not args.cases else {
        (m, int(b), d) for m, b, d in (item.split(":") for item in args.cases.split(","))}
    return [case for case in CASES
            if (not args.dtype or case[2] == args.dtype) and (wanted is None or case in wanted)]


class Recorder:
    """Appends one result per case and rewrites ``path`` each time (partial runs keep data)."""

    def __init__(self, path: str, header: dict):
        self.path, self.data = path, {**header, "results": []}

    def add(self, result: dict) -> None:
        self.data["results"].append(result)
        print(json.dumps(result), flush=True)
        pathlib.Path(self.path).write_text(json.dumps(self.data, indent=1))


def run_jax(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax_side import build_efficientdet, make_detection_train_step, synthetic_gt

    from effdet_jax.detection.postprocess import postprocess

    dev = jax.devices()[0]
    rec = Recorder(args.out, {
        "side": "jax", "device": dev.device_kind, "platform": dev.platform,
        "jax": jax.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"), "image_size": args.image_size, "model": args.model,
        "depthwise_grad": args.depthwise_grad,
    })
    start = time.perf_counter()
    size = args.image_size
    if args.depthwise_grad == "autodiff":
        # XLA's own kernel gradient (a batch-grouped convolution: cuDNN's filter gradient on GPU)
        # in place of the library's folded per-tap form, to compare the two on this device.
        from effdet_jax.ops import depthwise

        def autodiff_bwd(stride, pads, dilation, residuals, g):
            x, kernel = residuals
            plain = lambda x, k: depthwise.depthwise_lax_plain(x, k, stride, pads, dilation)  # noqa: E731
            return jax.vjp(plain, x, kernel)[1](g)

        depthwise._BACKWARD["lax"] = autodiff_bwd  # the non-CPU branch of the platform choice
        depthwise._VJPS["lax"] = depthwise.depthwise_lax_plain  # cpu_kernels="off"
    for mode, batch, dtype in selected_cases(args):
        if time.perf_counter() - start > args.budget_s:
            print(f"budget exceeded, skipping {mode} b{batch} {dtype}", flush=True)
            continue
        model, anchors, num_classes = build_efficientdet(args.model, size, {"dtype": dtype})
        rng = np.random.default_rng(0)
        images = jnp.asarray(rng.standard_normal((batch, size, size, 3), np.float32))
        variables = jax.jit(lambda x, m=model: m.init(jax.random.key(0), x, train=False))(images[:1])
        t0 = time.perf_counter()
        if mode == "train":
            step, init_state = make_detection_train_step(model, anchors, num_classes)
            boxes, classes = synthetic_gt(batch, size, num_classes)
            extra = (jnp.asarray(boxes), jnp.asarray(classes))
            holder = {"state": init_state(variables)}
            compiled = jax.jit(step, donate_argnums=0).lower(holder["state"], images, *extra).compile()

            def fn(compiled=compiled, holder=holder, extra=extra, images=images):
                holder["state"], loss = compiled(holder["state"], images, *extra)
                loss.block_until_ready()
        else:
            def infer(v, x, model=model, anchors=anchors, mode=mode):
                cls_out, box_out = model.apply(v, x, train=False)
                if mode == "e2e":
                    return postprocess(cls_out, box_out, anchors, model.config.image_size)
                return cls_out, box_out

            compiled = jax.jit(infer).lower(variables, images).compile()

            def fn(compiled=compiled, variables=variables, images=images):
                jax.block_until_ready(compiled(variables, images))
        compile_s = time.perf_counter() - t0
        stats = timed(fn, args.warmup, args.repeats)
        mem = compiled.memory_analysis()
        footprint = None
        if mem is not None:
            footprint = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                         + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20
        rec.add({"mode": mode, "batch": batch, "dtype": dtype, **stats,
                 "images_per_s": batch / (stats["median_ms"] / 1e3), "compile_s": round(compile_s, 1),
                 "memory_mb": None if footprint is None else round(footprint)})
        del compiled, fn, variables


def run_torch(args) -> None:
    import torch
    from torch_side import synthetic_target

    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from importlib.metadata import version

    import effdet

    rec = Recorder(args.out, {
        "side": "torch", "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "effdet": version("effdet"), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"), "image_size": args.image_size, "model": args.model,
    })
    name = "tf_efficientdet_" + args.model.split("-")[-1]
    size = args.image_size

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for mode, batch, dtype in selected_cases(args):
        torch.manual_seed(0)
        task = {"train": "train", "e2e": "predict"}.get(mode, "")
        model = effdet.create_model(
            name, bench_task=task, pretrained=False, pretrained_backbone=False,
            image_size=(size, size), bench_labeler=(mode == "train"),
        ).to(dev)
        images = torch.randn(batch, 3, size, size, device=dev)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=(dtype == "bfloat16"))
        if mode == "train":
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
            target = {k: v.to(dev) for k, v in synthetic_target(batch, size, model.num_classes).items()}

            def fn(model=model, opt=opt, target=target, images=images, autocast=autocast):
                opt.zero_grad(set_to_none=True)
                with autocast:
                    loss = model(images, target)["loss"]
                loss.backward()
                opt.step()
                sync()
        else:
            model.eval()

            def fn(model=model, images=images, autocast=autocast):
                with torch.inference_mode(), autocast:
                    model(images)
                sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        first_s = time.perf_counter() - t0
        stats = timed(fn, args.warmup, args.repeats)
        mem = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
        rec.add({"mode": mode, "batch": batch, "dtype": dtype, **stats,
                 "images_per_s": batch / (stats["median_ms"] / 1e3), "first_call_s": round(first_s, 1),
                 "memory_mb": None if mem is None else round(mem)})
        del model, fn
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def table(jax_path: str, torch_path: str) -> str:
    """Markdown rows pairing the two sides' cases; the ratio is torch median / ours."""
    jx, th = json.loads(pathlib.Path(jax_path).read_text()), json.loads(pathlib.Path(torch_path).read_text())
    theirs = {(r["mode"], r["batch"], r["dtype"]): r for r in th["results"]}
    lines = [f"{jx['model']} at {jx['image_size']}, {jx['device']} (jax {jx['jax']}; torch {th['torch']}, "
             f"effdet {th['effdet']}), {jx['date']}", "",
             "| case | batch | dtype | effdet ms | effdet_jax ms | speed-up | effdet img/s "
             "| effdet_jax img/s | memory effdet / jax (MiB) |", "|---|---|---|---|---|---|---|---|---|"]

    def ms(r):
        return f"{r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f})"

    for r in jx["results"]:
        t = theirs.get((r["mode"], r["batch"], r["dtype"]))
        if t is None:
            continue
        lines.append(f"| {r['mode']} | {r['batch']} | {r['dtype']} | {ms(t)} | {ms(r)} | "
                     f"{t['median_ms'] / r['median_ms']:.2f}x | {t['images_per_s']:.1f} | "
                     f"{r['images_per_s']:.1f} | {t['memory_mb']} / {r['memory_mb']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["jax", "torch"])
    parser.add_argument("--out")
    parser.add_argument("--model", default="efficientdet-d0")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", help="only the cases of this dtype")
    parser.add_argument("--cases", help="only these cases, e.g. train:4:float32,train:8:float32")
    parser.add_argument("--depthwise-grad", choices=["library", "autodiff"], default="library",
                        help="jax side: the library's folded depthwise kernel gradient or XLA's")
    parser.add_argument("--budget-s", type=float, default=1e9)
    parser.add_argument("--table", nargs=2, metavar=("JAX_JSON", "TORCH_JSON"))
    args = parser.parse_args()
    if args.table:
        print(table(*args.table))
    elif args.side == "jax":
        run_jax(args)
    else:
        run_torch(args)


if __name__ == "__main__":
    main()
