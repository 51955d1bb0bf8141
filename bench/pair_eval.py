"""Does compiling the evaluation change its accuracy? The same sets, evaluated eagerly and through
``torch.compile`` with the same seeds, paired by seed (issue 23: no accuracy is traded).

    .venv/bin/python bench/pair_eval.py [--data parquet:../shared/data/cifar10-jpeg.parquet]
        [--arch ConvNetW32] [--ipc 10] [--runs 3] [--epochs 300] [--seeds 5] [--group auto|on|off] [--json]

For each seed s (sample size fixed by ``--seeds`` before the run) the set is the random-real subset
of seed s (what a set holds does not matter for the question), evaluated twice by
:func:`ptmdd_ray.evaluate.evaluate_set` with seed s: ``compile: false`` and ``compile: true``, with
grouping as ``--group`` for both. Reported: the mean test accuracy of each side per seed, their
paired difference with its 95 % t-interval and two-sided paired t-test p, and the verdict ("no
significant difference" if p >= 0.05). ``--json`` prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from emit import emit  # noqa: E402 - bench/ is on the path (the script's own folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=f"parquet:{ROOT.parent / 'shared/data/cifar10-jpeg.parquet'}")
    p.add_argument("--im-size", type=int, default=0)
    p.add_argument("--test-per-class", type=int, default=0)
    p.add_argument("--arch", default="ConvNetW32")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--group", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from ptmdd_ray.config import EvalConfig, build_config
    from ptmdd_ray.data import load_data
    from ptmdd_ray.evaluate import evaluate_set, random_real_subset
    from ptmdd_ray.stats import paired

    ds = {"name": args.data, **({"im_size": args.im_size} if args.im_size else {}),
          **({"test_per_class": args.test_per_class} if args.test_per_class else {})}
    data = load_data(build_config({"dataset": ds}).dataset, 0)
    group = {"auto": None, "on": True, "off": False}[args.group]
    sides: dict[str, list[float]] = {"eager": [], "compiled": []}
    for seed in range(args.seeds):
        x, y = random_real_subset(data, args.ipc, seed)
        for side in sides:
            cfg = EvalConfig(archs=[args.arch], runs=args.runs, epochs=args.epochs, augment=True,
                             compile=side == "compiled", group=group)
            acc = evaluate_set(x, y, data, cfg, seed, progress=False, splits=("test",))["test"][args.arch]["mean"]
            sides[side].append(100 * acc)
        print(f"seed {seed}: eager {sides['eager'][-1]:.2f} %, compiled {sides['compiled'][-1]:.2f} %", file=sys.stderr)
    test = paired(dict(enumerate(sides["compiled"])), dict(enumerate(sides["eager"])))
    lo, hi = test["ci"] if test["ci"] else (float("nan"), float("nan"))
    res = {"data": args.data, "arch": args.arch, "ipc": args.ipc, "runs": args.runs, "epochs": args.epochs,
           "seeds": args.seeds, "group": args.group, "eager": sides["eager"], "compiled": sides["compiled"],
           "eager_mean": statistics.fmean(sides["eager"]), "compiled_mean": statistics.fmean(sides["compiled"]),
           "diff": test["diff"], "ci": [lo, hi], "p": test["p"],
           "verdict": "significant difference" if test["p"] < 0.05 else "no significant difference"}
    print(f"compiled - eager: {res['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}] points, p = {res['p']:.3g} "
          f"(n = {args.seeds}): {res['verdict']}", file=sys.stderr)
    emit(res, args.json, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
