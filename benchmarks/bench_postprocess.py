"""Post-processing latency on D0-shaped outputs: jitted effdet_jax vs effdet (PyTorch).

Inputs are automl's reference d0 outputs (``d0/outputs.npz``, 2 images, 49104 anchors x 90
classes) tiled to the batch size. Each case is timed ``--repeats`` times after ``--warmup`` calls
(compilation excluded); we report the median, min and max in milliseconds.

JAX cases (one jitted function from raw per-level outputs to fixed-size detections):
  * ``automl default``: global soft-NMS (gaussian), best class per anchor, top 5000 candidates;
  * ``automl, all anchors``: the same without the top-5000 pre-selection (what automl itself does);
  * ``per-class hard``: best class per anchor, per-class hard NMS;
  * ``effdet-equivalent``: top 5000 (anchor, class) pairs, per-class hard NMS (effdet's algorithm).
The effdet side runs in the PyTorch venv (this script re-runs itself there with ``--torch-side``):
``bench._post_process`` + ``bench._batch_detection`` (torchvision ``batched_nms``), which is what
``DetBenchPredict`` does after the network.

    .venv/bin/python benchmarks/bench_postprocess.py            # both sides, markdown table
    .venv/bin/python benchmarks/bench_postprocess.py --no-torch # JAX only
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT.parent / "shared" / "reference" / "automl"
DEFAULT_TORCH_PYTHON = pathlib.Path.home() / ".cache/effdet_jax/torch-venv/bin/python"
LEVELS = range(3, 8)


def load_outputs(reference: pathlib.Path, batch: int) -> tuple[list, list]:
    """Per-level NHWC ``cls`` [B, H, W, 810] and ``box`` [B, H, W, 36], tiled to ``batch``."""
    with np.load(reference / "d0" / "outputs.npz") as data:
        def tile(x: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))

        cls = [tile(data[f"cls_{lvl}"]) for lvl in LEVELS]
        return cls, [tile(data[f"box_{lvl}"]) for lvl in LEVELS]


def timed(fn, warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def torch_side(args: argparse.Namespace) -> None:
    """Runs in the PyTorch venv; prints one JSON dict ``{batch: stats}``."""
    import torch
    from effdet.anchors import Anchors
    from effdet.bench import _batch_detection, _post_process

    torch.set_num_threads(args.threads)
    anchors = Anchors(3, 7, 3, [1.0, 2.0, 0.5], 4.0, (512, 512))
    results = {}
    for batch in args.batches:
        cls, box = load_outputs(pathlib.Path(args.reference), batch)
        # effdet's heads return NCHW; the permutation is not part of the timed work.
        cls = [torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() for x in cls]
        box = [torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() for x in box]
        scale = torch.ones(batch)

        def run(cls=cls, box=box, batch=batch, scale=scale) -> torch.Tensor:
            with torch.no_grad():
                c, b, idx, classes = _post_process(cls, box, 5, 90, max_detection_points=5000)
                return _batch_detection(batch, c, b, anchors.boxes, idx, classes, scale, None,
                                        max_det_per_image=100, soft_nms=False)

        results[batch] = timed(run, args.warmup, args.repeats)
    print(json.dumps(results))


def jax_side(args: argparse.Namespace) -> dict[str, dict[int, dict[str, float]]]:
    import jax

    from effdet_jax.detection.anchors import AnchorConfig, generate_anchors
    from effdet_jax.detection.postprocess import PostprocessConfig, postprocess

    anchors = generate_anchors(AnchorConfig(aspect_ratios=(1.0, 2.0, 0.5), image_size=512))
    cases = {
        "automl default (global soft-NMS, top 5000)": PostprocessConfig(),
        "automl, all 49104 anchors (global soft-NMS)": PostprocessConfig(pre_nms_top_k=0),
        "per-class hard NMS (top 5000 anchors)": PostprocessConfig(method="hard", per_class=True),
        "effdet-equivalent (top 5000 pairs, per-class hard)": PostprocessConfig(
            method="hard", per_class=True, candidates="top_pairs", clip_boxes=False
        ),
    }
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in cases}
    for batch in args.batches:
        cls, box = load_outputs(pathlib.Path(args.reference), batch)
        cls, box = jax.device_put((cls, box))
        for name, config in cases.items():
            fn = jax.jit(lambda c, b, config=config: postprocess(c, b, anchors, 512, None, config))
            results[name][batch] = timed(
                lambda fn=fn, c=cls, b=box: jax.block_until_ready(fn(c, b)),
                args.warmup,
                args.repeats,
            )
    return results


def fmt(stats: dict[str, float]) -> str:
    return f"{stats['median']:.1f} ({stats['min']:.1f}-{stats['max']:.1f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--reference", default=os.environ.get("AUTOML_REFERENCE", DEFAULT_REFERENCE))
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", DEFAULT_TORCH_PYTHON))
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--torch-side", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_side:
        torch_side(args)
        return

    results = jax_side(args)
    if not args.no_torch:
        cmd = [str(args.torch_python), __file__, "--torch-side", "--reference", str(args.reference),
               "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--batches", *map(str, args.batches)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        torch_results = json.loads(done.stdout.strip().splitlines()[-1])
        results["effdet 0.4.1 (PyTorch, torchvision batched_nms)"] = {
            int(k): v for k, v in torch_results.items()
        }
    header = "| post-processing | " + " | ".join(f"batch {b} (ms)" for b in args.batches) + " |"
    print(header)
    print("|" + "---|" * (len(args.batches) + 1))
    for name, per_batch in results.items():
        print(f"| {name} | " + " | ".join(fmt(per_batch[b]) for b in args.batches) + " |")
    print(f"\nmedian (min-max) of {args.repeats} runs after {args.warmup} warm-up calls; "
          f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
