"""Cost of each arm of a sweep, measured alone: parameters and multiply-adds (``effdet_jax.summary``,
counted, no compute) and the network's inference and train-step time from the benchmark harness
(``benchmarks/common.py``: every case in a fresh process, after waiting for the 1-minute load
average to drop below ``--max-load``, with that load recorded). Writes ``OUT/cost.json``, which
``ablate.py`` reads for the cost columns of the same folder's ``table.md``.

  python experiments/cost.py --sweep=fusion
  python experiments/cost.py --sweep=drop_connect --rates 0.2
  python experiments/cost.py --sweep config.model.fpn_weight_method=sum,fastattn --base=configs/tiny.py

The arms are ``ablate.py``'s (same ``--sweep`` / ``--base`` / ``--rates`` / ``--set``); each arm's
resolved config gives the model, its class count and input size. ``infer`` is ``model.apply`` in
inference mode at ``--infer-batch``; ``train`` is ``benchmarks/jax_side.py``'s training step
(forward in train mode with drop-connect, on-device targets, the detection loss, backward, an SGD
momentum update) at the arm's ``config.train.batch_size``. Rounds alternate the arms
(``--processes`` rounds, one fresh process per arm and mode each), so drift in the machine's speed
reaches every arm alike; each arm's times pool all rounds (``common.pool_processes``), and the
table compares the arms by their fastest process's median (small cases run at one of two speeds
depending on the process).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):  # run as a script: experiments/, configs/, the harness
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from effdet_jax.ablation import report, sweep  # noqa: E402

MODES = ("infer", "train")


def count(config) -> dict:
    """``{"params", "macs"}`` of an arm's model at its input size, per image."""
    from effdet_jax.summary import summarize
    from effdet_jax.train.experiment import build_model

    s = summarize(build_model(config.model))
    return {"params": int(s.params), "macs": int(s.macs)}


def case_of(config, mode: str, batch: int, warmup: int, repeats: int) -> dict:
    """The ``benchmarks/jax_side.py`` case of an arm: its model name, class count, input size
    and every other set model field as ``overrides``."""
    from effdet_jax.train.experiment import model_overrides

    overrides = model_overrides(config.model)
    size = overrides.pop("image_size", None) or overrides.get("overrides", {}).get("image_size")
    if size is None:
        from effdet_jax.models.model_config import get_efficientdet_config

        size = get_efficientdet_config(config.model.name).image_size
    size = int(size if isinstance(size, int) else size[0])
    return {"model": config.model.name, "mode": mode, "batch": batch, "image_size": size,
            "num_classes": int(config.model.num_classes), "overrides": overrides,
            "warmup": warmup, "repeats": repeats}


def _one_or_per_arm(values: dict[str, int]) -> int | str:
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else "the arm's config.train.batch_size"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sweep.add_arguments(parser)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--infer-batch", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=None,
                        help="train-step batch (default: the arm's config.train.batch_size)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per process")
    parser.add_argument("--processes", type=int, default=6,
                        help="fresh processes per arm and mode (the table shows the fastest one's "
                             "median: enough processes that one runs at the fast speed)")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="wait until the 1-min load average is below this before each case")
    parser.add_argument("--load-timeout", type=float, default=600)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes={args.modes!r}: choose from {MODES}")

    from common import MALLOC_ENV, machine_info, pool_processes, run_case, wait_for_low_load

    try:
        spec, configs, out = sweep.from_command_line(args, ROOT / "experiments" / "results")
    except sweep.SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    train_batch = {label: args.train_batch or int(c.train.batch_size) for label, c in configs.items()}
    arms = {label: count(c) for label, c in configs.items()}
    env = {**MALLOC_ENV["cached"],
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    script = ROOT / "benchmarks" / "jax_side.py"
    samples: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.processes):
        for mode in modes:
            for label, config in configs.items():
                batch = args.infer_batch if mode == "infer" else train_batch[label]
                case = case_of(config, mode, batch, args.warmup, args.repeats)
                load = wait_for_low_load(args.max_load, args.load_timeout)
                result = run_case(sys.executable, script, case, args.threads, env=env)
                result["load_wait_end"] = round(load, 2)
                samples.setdefault((label, mode), []).append(result)
                shown = {k: result.get(k) for k in ("median_ms", "compile_s", "load_before", "error")}
                print(json.dumps({"arm": label, "mode": mode, **shown}), flush=True)
    for (label, mode), runs in samples.items():
        arms[label][mode] = pool_processes(runs)

    machine = machine_info(jax_python=sys.executable)  # the interpreter that ran the cases
    machine.pop("torch_side", None)
    cost = {"command": ["experiments/cost.py", *(argv if argv is not None else sys.argv[1:])],
            "machine": machine, "threads": args.threads, "processes": args.processes,
            "infer_batch": args.infer_batch,
            "train_batch": _one_or_per_arm(train_batch),
            "max_load": args.max_load, "malloc": "cached", "arms": arms}
    (out / report.COST_FILE).write_text(json.dumps(cost, indent=1))
    print("\n".join(report.cost_rows(cost, list(arms))))
    errors = [f"{label} {mode}" for (label, mode), runs in samples.items() if "error" in arms[label][mode]]
    if errors:
        print(f"error: cases failed: {', '.join(errors)} (messages in {out / report.COST_FILE})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
