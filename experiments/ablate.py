"""Run an ablation sweep: each arm x each seed is a full ``main.py`` training run, then a markdown
table (mean +- std of AP, AP50, steps/s, params) and a plot of AP50 against steps per arm.

  python experiments/ablate.py --sweep=fusion --seeds=2 --out=experiments/results/fusion
  python experiments/ablate.py --sweep=drop_connect --base=configs/shapes.py \
      --set=config.train.total_steps=300

Sweeps are defined once, by ``sweep()`` in ``configs/ablations/SWEEP.py`` (one module per sweep):
  fusion        config.model.fpn_weight_method in every BiFPN fusion method
  drop_connect  config.model.drop_connect_variant in every drop-connect variant, at ``--rates``
                (backbone drop-connect rate; ``none`` runs once)
``--rates`` goes to the sweeps whose ``sweep()`` takes ``rates``.

Each run is a subprocess (``main.py --mode=train_and_eval``) with its own workdir under ``--out``, so a
crashed arm is reported and does not take the sweep down, and finished runs are reused on a rerun.
Metrics are read back from the run's TensorBoard events (``eval/AP``, ``eval/AP50``,
``train/steps_per_sec``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: configs/ is imported from the repository root
    sys.path.insert(0, str(ROOT))
# One sweep per module of configs/ablations/.
SWEEPS = tuple(sorted(p.stem for p in (ROOT / "configs" / "ablations").glob("*.py")
                      if p.stem != "__init__"))


@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration of the sweep: a label and its ``--config.*`` overrides."""

    label: str
    overrides: tuple[tuple[str, str], ...]


def sweep_arms(sweep: str, rates: list[float]) -> list[Arm]:
    """The arms of ``configs/ablations/<sweep>.py``'s ``sweep()`` as ``--config.*`` overrides."""
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; choose one of {SWEEPS}")
    definition = importlib.import_module(f"configs.ablations.{sweep}").sweep
    takes_rates = "rates" in inspect.signature(definition).parameters
    arms = definition(rates=rates) if takes_rates else definition()
    return [Arm(label, tuple((f"config.{key}", str(value)) for key, value in overrides.items()))
            for label, overrides in arms.items()]


def read_events(workdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the run's TensorBoard event files."""
    import tensorflow as tf

    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(workdir.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.HasField("tensor"):
                    array = tf.make_ndarray(value.tensor)
                    if array.size != 1:
                        continue
                    number = float(array.reshape(()))
                elif value.HasField("simple_value"):
                    number = float(value.simple_value)
                else:
                    continue
                series.setdefault(value.tag, []).append((int(event.step), number))
    return {tag: sorted(points) for tag, points in series.items()}


def run_arm(arm: Arm, seed: int, args, out: pathlib.Path) -> dict:
    """Train + evaluate one (arm, seed); returns its summary (reusing a finished run)."""
    workdir = out / "runs" / f"{arm.label}_seed{seed}"
    result_path = workdir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "main.py"), f"--config={args.base}", f"--workdir={workdir}",
           "--mode=train_and_eval", f"--config.train.seed={seed}"]
    cmd += [f"--{k}={v}" for k, v in arm.overrides]
    cmd += [f"--{s}" for s in args.set]
    start = time.time()
    # main.py writes its full log to workdir/log.txt itself; this is what it printed.
    with open(workdir / "console.txt", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    result = {"arm": arm.label, "seed": seed, "returncode": proc.returncode,
              "wall_s": time.time() - start}
    if proc.returncode != 0:
        result["error"] = f"exit {proc.returncode}; see {workdir / 'console.txt'} and log.txt"
        return result
    events = read_events(workdir)
    result["curve_ap50"] = events.get("eval/AP50", [])
    result["curve_ap"] = events.get("eval/AP", [])
    result["ap"] = result["curve_ap"][-1][1] if result["curve_ap"] else float("nan")
    result["ap50"] = result["curve_ap50"][-1][1] if result["curve_ap50"] else float("nan")
    speed = [v for _, v in events.get("train/steps_per_sec", []) or events.get("steps_per_sec", [])]
    result["steps_per_sec"] = statistics.median(speed) if speed else float("nan")
    result_path.write_text(json.dumps(result))
    return result


def count_params(args, arm: Arm) -> int:
    """Parameters of the arm's model, from ``main.py --mode=summary`` (no compute)."""
    cmd = [sys.executable, str(ROOT / "main.py"), f"--config={args.base}", "--mode=summary"]
    cmd += [f"--{k}={v}" for k, v in arm.overrides] + [f"--{s}" for s in args.set]
    text = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout
    for line in text.splitlines():
        if line.startswith("total"):
            return int(line.split()[1].replace(",", ""))
    return -1


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_table(results: dict[str, list[dict]], params: dict[str, int], path: pathlib.Path) -> str:
    lines = ["| arm | AP | AP50 | steps/s | params | seeds |", "|---|---|---|---|---|---|"]
    for label, runs in results.items():
        ok = [r for r in runs if r.get("returncode") == 0]
        failed = len(runs) - len(ok)
        lines.append(
            f"| {label} | {_mean_std([r['ap'] for r in ok])} | {_mean_std([r['ap50'] for r in ok])} "
            f"| {_mean_std([r['steps_per_sec'] for r in ok])} | {params.get(label, -1):,} "
            f"| {len(ok)}{f' ({failed} failed)' if failed else ''} |"
        )
    table = "\n".join(lines) + "\n"
    path.write_text(table)
    return table


def write_plot(results: dict[str, list[dict]], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in results.items():
        curves = [dict(r["curve_ap50"]) for r in runs if r.get("curve_ap50")]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[s] for s in steps] for c in curves])
        mean = values.mean(axis=0)
        ax.plot(steps, mean, marker="o", label=label)
        if len(curves) > 1:
            std = values.std(axis=0)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("COCO AP50 (eval split)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", required=True, choices=SWEEPS)
    parser.add_argument("--base", default="configs/shapes.py", help="base config file")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.2])
    parser.add_argument("--set", action="append", default=[],
                        help="extra override, e.g. config.train.total_steps=300 (repeatable)")
    parser.add_argument("--out", default=None, help="results folder (default experiments/results/SWEEP)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out or ROOT / "experiments" / "results" / args.sweep)
    out.mkdir(parents=True, exist_ok=True)
    arms = sweep_arms(args.sweep, args.rates)
    results: dict[str, list[dict]] = {}
    params: dict[str, int] = {}
    for arm in arms:
        params[arm.label] = count_params(args, arm)
        for seed in range(args.seeds):
            r = run_arm(arm, seed, args, out)
            results.setdefault(arm.label, []).append(r)
            print(json.dumps({k: v for k, v in r.items() if not k.startswith("curve")}), flush=True)
    table = write_table(results, params, out / "table.md")
    write_plot(results, out / "ap50.png", f"{args.sweep} ablation on {os.path.basename(args.base)}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
