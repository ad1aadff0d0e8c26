"""Runs a .tflite file with LiteRT (``ai_edge_litert``) on uint8 images; executed by the onnx2tf
venv's Python (``effdet_jax/export/litert.py``), so it imports only numpy and ai_edge_litert.

    python run_tflite.py MODEL.tflite IMAGES.npy OUT.npz [--repeats=N] [--no-delegates]

``IMAGES.npy``: uint8 ``[B, H, W, 3]``; a file with a dynamic batch (-1 in the input's
``shape_signature``) runs on all ``B`` at once (the signature runner resizes its input tensor to
``B`` and reallocates), a file with a fixed batch ``b`` dividing ``B`` on ``b`` images at a time
(outputs concatenated), in this one process. Writes every output of the
model's default signature to ``OUT.npz`` under its name, and ``__latency_ms__`` (one value per
repeat, after one warm-up) when ``--repeats`` is given. ``--no-delegates``: LiteRT's builtin
kernels without its default XNNPACK delegate.
"""

import argparse
import time

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("images")
    parser.add_argument("out")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--no-delegates", action="store_true")
    args = parser.parse_args()
    images = np.load(args.images)
    resolver = (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if args.no_delegates
                else OpResolverType.AUTO)
    runner = Interpreter(model_path=args.model,
                         experimental_op_resolver_type=resolver).get_signature_runner()
    ((input_name, detail),) = runner.get_input_details().items()
    batch = int(detail["shape_signature"][0])  # -1: a dynamic batch
    if batch > 0 and len(images) % batch:
        raise SystemExit(f"{args.model} takes a fixed batch of {batch}; give a multiple of it, "
                         f"not {len(images)} images")
    if batch < 1 or batch == len(images):
        outputs = runner(**{input_name: images})
    else:
        chunks = [runner(**{input_name: images[i:i + batch]}) for i in range(0, len(images), batch)]
        outputs = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        images = images[:batch]  # (the timed runs below take one batch)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        runner(**{input_name: images})
        times.append((time.perf_counter() - start) * 1e3)
    if times:
        outputs["__latency_ms__"] = np.asarray(times)
    np.savez(args.out, **outputs)


if __name__ == "__main__":
    main()
