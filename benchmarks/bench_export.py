"""CPU latency at batch 1 of an exported EfficientDet in its own runtime next to the JAX model,
in one run (one process, same machine state).

Rows per model: ``jax`` (the model as evaluation runs it: CPU kernels on, jitted, uint8 in,
normalisation inside), ``stablehlo`` (the exported plain-XLA graph, ``jax.export.deserialize``),
``onnx`` (onnxruntime, CPU provider, default threads) and, for raw outputs, ``tflite`` (float32
LiteRT converted from the ONNX file by onnx2tf, ``ai_edge_litert`` with its default XNNPACK
delegate, in the onnx2tf venv: ``make onnx2tf``), and with ``--files`` already exported
SavedModel (TensorFlow, this process) / LiteRT files. Raw outputs and with NMS. Weights are
random (latency does not depend on them, but NMS work does a little); each case is timed
``--repeats`` times after warm-up, compilation / session creation excluded.

    .venv/bin/python benchmarks/bench_export.py --model=efficientdet-d0 --image-size=512
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import fmt_ms, timed  # noqa: E402

from effdet_jax import efficientdet  # noqa: E402
from effdet_jax.detection.postprocess import PostprocessConfig  # noqa: E402
from effdet_jax.export import check_images, formats, serving  # noqa: E402


def random_variables(model, size: int) -> dict:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.05).astype(s.dtype), shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientdet-d0")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--files", default="",
                        help="already exported raw-output files of this model and size to time "
                             "too, FORMAT:PATH,... (savedmodel:DIR/saved_model, "
                             "tflite:DIR/model.tflite), e.g. from --mode=export")
    parser.add_argument("--nms", default="both", choices=("both", "raw"),
                        help="'raw': the raw-output cases only")
    parser.add_argument("--runtimes", default="tflite",
                        help="extra runtimes: 'tflite' (needs `make onnx2tf`; raw outputs only, "
                             "LiteRT takes no NMS loop) or ''")
    args = parser.parse_args()
    model = efficientdet(args.model, image_size=args.image_size)
    variables = random_variables(model, args.image_size)
    images = check_images(1, args.image_size, args.image_size)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for with_nms in (False, True) if args.nms == "both" else (False,):
            pp = PostprocessConfig() if with_nms else None
            names = serving.output_names(model, with_nms)
            plain_fn = serving.make_serving_fn(model, variables, pp)
            # The JAX row: the same computation on the model as training / evaluation builds it.
            jax_fn = jax.jit(_with_model(model, variables, pp))
            cases = {"jax": lambda f=jax_fn: jax.block_until_ready(f(images))}
            spec = formats.input_spec(1, args.image_size, args.image_size)
            sizes = {"jax": "-"}
            for fmt in ("stablehlo", "onnx"):
                path = formats.write(fmt, plain_fn, spec, tmp, names)
                sizes[fmt] = f"{os.path.getsize(path) / 2**20:.1f} MiB"
                cases[fmt] = _runner(fmt, path, names)
                onnx_path = path
            if not with_nms and "tflite" in args.runtimes:
                # LiteRT (float32) from the ONNX file, timed inside the onnx2tf venv's process.
                path = formats.write_converted(["tflite"], onnx_path, tmp)["tflite"]
                sizes["tflite"] = f"{os.path.getsize(path) / 2**20:.1f} MiB"
                cases["tflite"] = _litert_case(path, names, args.image_size, args.repeats)
            for spec in [f for f in args.files.split(",") if f] if not with_nms else []:
                fmt, path = spec.split(":", 1)
                key = f"{fmt} (file)"
                sizes[key] = f"{_size_mib(path):.1f} MiB"
                cases[key] = (_litert_case(path, names, args.image_size, args.repeats)
                              if fmt == "tflite" else _savedmodel_runner(path))
            for name, fn in cases.items():
                if isinstance(fn, dict):  # measured in another process
                    r = dict(fn)
                else:
                    r = timed(fn, warmup=2, repeats=args.repeats)
                r.update(model=args.model, image_size=args.image_size, nms=with_nms, runtime=name,
                         file_size=sizes[name])
                results.append(r)
                print(f"| {args.model} {args.image_size} | {'NMS' if with_nms else 'raw'} | {name} | "
                      f"{sizes[name]} | {fmt_ms(r)} |", flush=True)
    print(json.dumps([{k: v for k, v in r.items() if k != "times_ms"} for r in results]))


def _with_model(model, variables, pp):
    """The serving computation on ``model`` as given (CPU kernels per its config)."""
    cfg = model.config
    mean, std = (jnp.asarray(v, jnp.float32) for v in cfg.normalization)
    from effdet_jax.detection import anchors
    from effdet_jax.detection.postprocess import postprocess

    boxes = jnp.asarray(anchors.generate_anchors(cfg.anchor_config()))

    def run(images):
        cls_out, box_out = model.apply(variables, (images.astype(jnp.float32) - mean) / std)
        if pp is None:
            return tuple(cls_out) + tuple(box_out)
        return postprocess(cls_out, box_out, boxes, cfg.image_size, None, pp)

    return run


def _litert_case(path: str, names, size: int, repeats: int) -> dict:
    """LiteRT latency (ms) of ``path`` at batch 1, one warm-up then ``repeats`` timed runs in the
    onnx2tf venv (``effdet_jax.export.litert.run_tflite``)."""
    from effdet_jax.export import litert

    _, times = litert.run_tflite(path, check_images(1, size, size), names, repeats=repeats)
    times = [float(t) for t in times]
    return {"median_ms": float(np.median(times)), "min_ms": min(times), "max_ms": max(times),
            "runs": len(times), "times_ms": [round(t, 3) for t in times]}


def _size_mib(path: str) -> float:
    if os.path.isdir(path):
        return sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file()) / 2**20
    return os.path.getsize(path) / 2**20


def _savedmodel_runner(path: str):
    """The SavedModel's ``serving_default`` in TensorFlow (this process), eager call."""
    import tensorflow as tf

    signature = tf.saved_model.load(path).signatures["serving_default"]
    shape = signature.structured_input_signature[1]["images"].shape
    images = tf.constant(check_images(1, shape[1], shape[2]))
    return lambda: [x.numpy() for x in signature(images=images).values()]


def _runner(fmt: str, path: str, names):
    if fmt == "stablehlo":
        with open(path, "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        call = jax.jit(exported.call)
        images = check_images(1, *exported.in_avals[0].shape[1:3])
        return lambda: jax.block_until_ready(call(images))
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    images = check_images(1, shape[1], shape[2])
    return lambda: session.run(list(names), {"images": images})


if __name__ == "__main__":
    main()
