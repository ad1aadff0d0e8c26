"""Where does a step's time go? Trace one jitted case with ``jax.profiler`` and rank the XLA ops.

Runs the same functions as ``jax_side.py`` (``--case`` JSON), traces ``--steps`` calls after
warm-up, then sums the trace's per-op durations by op name and by op kind (the HLO opcode of the
fusion root or op: ``convolution``, ``dot``, ``reduce``, element-wise ``fusion`` ...), and prints
the top ones. The HLO text of the compiled step can be written with ``--hlo``.

    .venv/bin/python benchmarks/profile_step.py --case '{"model": "efficientdet-d0",
        "mode": "train", "batch": 2, "image_size": 256}' --top 30
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import pin_threads  # noqa: E402


def build(case: dict):
    """``(compiled, call)``: the compiled executable and a no-argument blocking call."""
    import jax
    import jax.numpy as jnp
    import jax_side
    import numpy as np

    from effdet_jax import efficientnet

    name, batch, size = case["model"], case["batch"], case["image_size"]
    overrides = dict(case.get("overrides", {}))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3), np.float32))
    if name.startswith("efficientdet"):
        model, anchors, num_classes = jax_side.build_efficientdet(name, size, overrides)
    else:
        model = efficientnet(name, **overrides)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images[:1])
    if case["mode"] == "train":
        if name.startswith("efficientdet"):
            step, init_state = jax_side.make_detection_train_step(model, anchors, num_classes)
            boxes, classes = jax_side.synthetic_gt(batch, size, num_classes)
            args = (jnp.asarray(boxes), jnp.asarray(classes))
        else:
            step, init_state = jax_side.make_classifier_train_step(model)
            args = (jnp.zeros((batch,), jnp.int32),)
        holder = {"state": init_state(variables)}
        compiled = jax.jit(step, donate_argnums=0).lower(holder["state"], images, *args).compile()

        def call():
            holder["state"], loss = compiled(holder["state"], images, *args)
            loss.block_until_ready()
    else:
        compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
        compiled = compiled.compile()

        def call():
            jax.block_until_ready(compiled(variables, images))
    return compiled, call


def op_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> opcode, with fusions named by their fused computation's root opcode
    plus whether they contain a convolution / dot / reduce (what the fusion really computes)."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            comps[current] = []
        elif current is not None:
            comps[current].append(line)
    kinds = {}
    for lines in comps.values():
        for line in lines:
            # The result type is one token, or a tuple "(f32[..]{..}, s32[..]{..})" with spaces.
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^()]*\)|[^ ]+) ([\w\-]+)\(", line)
            if not m:
                continue
            name, opcode = m.group(1), m.group(2)
            if opcode == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", line)
                body = "\n".join(comps.get(called.group(1), [])) if called else ""
                tags = [t for t in ("convolution", "dot", "reduce-window", "reduce", "scatter",
                                    "gather", "pad", "slice") if f" {t}(" in body]
                opcode = "fusion[" + ",".join(tags) + "]"
            kinds[name] = opcode
    return kinds


def op_sources(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its ``op_name`` metadata with layer indices folded (``block_3`` ->
    ``block_*``), so time can be summed per kind of layer and pass (``jvp`` forward,
    ``transpose(jvp)`` backward)."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]+)\"", line)
        if m:
            src = re.sub(r"(block|node|cell|conv|bn|resample)_\d+", r"\1_*", m.group(2))
            src = re.sub(r"_p\d\b", "_p*", src)
            out[m.group(1)] = src
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--hlo", help="write the compiled HLO text here")
    args = parser.parse_args()
    pin_threads(int(os.environ.get("BENCH_THREADS", "2")))
    import jax

    case = json.loads(args.case)
    compiled, call = build(case)
    hlo = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    kinds = op_kinds(hlo)
    sources = op_sources(hlo)
    call()
    call()
    logdir = tempfile.mkdtemp(prefix="effdet_prof_")
    with jax.profiler.trace(logdir):
        for _ in range(args.steps):
            call()
    path = sorted(glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    by_name: collections.Counter = collections.Counter()
    for ev in events:
        if ev.get("ph") == "X" and ev.get("name") in kinds:
            by_name[ev["name"]] += ev["dur"] / 1e3 / args.steps
    by_kind: collections.Counter = collections.Counter()
    for name, ms in by_name.items():
        by_kind[kinds[name]] += ms
    total = sum(by_name.values())
    print(f"traced op time per step: {total:.0f} ms ({len(by_name)} ops)")
    print("\nby kind:")
    for kind, ms in by_kind.most_common(args.top):
        print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {kind}")
    by_source: collections.Counter = collections.Counter()
    for name, ms in by_name.items():
        by_source[sources.get(name, "?")] += ms
    print("\nby source (op_name metadata, layer indices folded):")
    for src, ms in by_source.most_common(args.top):
        print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {src}")
    print("\nby op:")
    for name, ms in by_name.most_common(args.top):
        print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {kinds[name]:28s} {name}")


if __name__ == "__main__":
    main()
