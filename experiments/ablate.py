"""Run an ablation sweep: every arm x seed is a full ``main.py`` training run; then per-arm means
with 95 % t-intervals, paired differences from the baseline arm, a table and curve plots.

  python experiments/ablate.py --sweep=fusion --seeds=3
  python experiments/ablate.py --sweep=drop_connect --rates 0.1 0.2 --seeds=3
  python experiments/ablate.py --sweep config.model.fpn_weight_method=sum,fastattn \
      --sweep config.train.learning_rate=0.002,0.004 --base=configs/tiny.py --out=/tmp/grid

``--sweep`` is a preset (``configs/ablations/NAME.py``) or ``KEY=V1,V2,...`` over any config key;
several make a grid (``effdet_jax/ablation/sweep.py``). The base config (default ``configs/shapes_long.py``:
3000 steps, an evaluation every 250) decides data source, model and run length; ``--set`` overrides
it for every arm. Every arm's config is built and validated before any run starts.

Each run has its own workdir, ``OUT/runs/ARM_seedN``: a finished run is reused, a crashed one is
reported and the sweep goes on, and the next invocation of the same command resumes an unfinished
run from its last checkpoint, so a sweep can span sessions. ``OUT/configs/ARM.json`` is each arm's
resolved config. Outputs (``effdet_jax/ablation/report.py``): ``results.json``, ``table.md``, ``ap50.png``,
``loss.png``; the cost columns come from ``OUT/cost.json`` (``experiments/cost.py``), never from
these runs' speed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
if str(ROOT) not in sys.path:  # run as a script: experiments/ and configs/ import from the root
    sys.path.insert(0, str(ROOT))

from effdet_jax.ablation import report, runs, sweep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sweep.add_arguments(parser)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    try:
        spec, configs, out = sweep.from_command_line(args, RESULTS)
    except sweep.SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for arm in spec.arms:
        (out / "configs" / f"{arm.dirname}.json").write_text(
            json.dumps(sweep.flatten(configs[arm.label]), indent=1, sort_keys=True))
    print(f"{len(spec.arms)} arms x {args.seeds} seeds on {spec.base}, baseline {spec.baseline}; "
          f"runs in {out / 'runs'}", flush=True)

    results: dict[str, list[dict]] = {}
    for arm in spec.arms:
        for seed in range(args.seeds):
            try:
                r = runs.run(arm, seed, spec.base, spec.extra_flags,
                             runs.run_config(configs[arm.label], seed), out)
            except sweep.SweepError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            results.setdefault(arm.label, []).append(r)
            shown = {k: r.get(k) for k in ("arm", "seed", "returncode", "ap", "ap50", "auc_ap50",
                                           "converged", "wall_s", "reused", "resumed", "error")
                     if k in r}
            print(json.dumps({"arm": arm.label, "seed": seed, **shown}), flush=True)

    title = f"{' x '.join(args.sweep)} on {pathlib.Path(spec.base.partition(':')[0]).name}"
    meta = {"command": ["experiments/ablate.py", *(argv if argv is not None else sys.argv[1:])],
            "base": runs.portable_command([spec.base])[0], "sweep": args.sweep, "set": list(spec.extra_flags),
            "seeds": args.seeds,
            "arms_overrides": {a.label: dict(a.overrides) for a in spec.arms}}
    print(report.write(out, results, spec.baseline, meta, title))
    failed = sum(1 for rs in results.values() for r in rs if r.get("returncode") != 0)
    if failed:
        print(f"{failed} run(s) failed (listed in {out / 'table.md'}); rerun the command to resume them",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
