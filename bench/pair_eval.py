"""Does a faster evaluation path change its accuracy? The same sets, evaluated both ways with the
same seeds, paired by seed (issue 23: no accuracy is traded). ``--compare compile``: eager against
``torch.compile``d training; ``--compare precision``: fp32 against bf16 autocast on the CPU
(``precision: bf16-cpu``), both compiled.

    .venv/bin/python bench/pair_eval.py [--compare compile|precision]
        [--data parquet:../shared/data/cifar10-jpeg.parquet] [--arch ConvNetW32] [--ipc 10] [--runs 3]
        [--epochs 300] [--seeds 5] [--group auto|on|off] [--json]

For each seed s (sample size fixed by ``--seeds`` before the run) the set is the random-real subset
of seed s (what a set holds does not matter for the question), evaluated twice by
:func:`ptmdd_ray.evaluate.evaluate_set` with seed s, once per side, with grouping as ``--group``
for both. Reported: the mean test accuracy of each side per seed (under the side's name, and
``sides`` names the baseline side first), their paired difference (second minus first) with its 95 %
t-interval and two-sided paired t-test p, and the verdict ("no significant difference" if
p >= 0.05). ``--json`` prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from emit import emit  # noqa: E402 - bench/ is on the path (the script's own folder)

# each comparison's two sides, the baseline first: (name, evaluation settings, precision)
SIDES = {"compile": (("eager", {"compile": False}, "bf16"), ("compiled", {"compile": True}, "bf16")),
         "precision": (("fp32", {"compile": True}, "fp32"), ("bf16-cpu", {"compile": True}, "bf16-cpu"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", choices=sorted(SIDES), default="compile", help="which two paths to pair")
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
    (base, *_), (new, *_) = SIDES[args.compare]
    sides: dict[str, list[float]] = {base: [], new: []}
    for seed in range(args.seeds):
        x, y = random_real_subset(data, args.ipc, seed)
        for side, settings, precision in SIDES[args.compare]:
            cfg = EvalConfig(archs=[args.arch], runs=args.runs, epochs=args.epochs, augment=True, group=group,
                             **settings)
            acc = evaluate_set(x, y, data, cfg, seed, progress=False, splits=("test",),
                               precision=precision)["test"][args.arch]["mean"]
            sides[side].append(100 * acc)
        print(f"seed {seed}: {base} {sides[base][-1]:.2f} %, {new} {sides[new][-1]:.2f} %", file=sys.stderr)
    test = paired(dict(enumerate(sides[new])), dict(enumerate(sides[base])))
    lo, hi = test["ci"] if test["ci"] else (float("nan"), float("nan"))
    res = {"compare": args.compare, "sides": [base, new], "data": args.data, "arch": args.arch, "ipc": args.ipc,
           "runs": args.runs, "epochs": args.epochs, "seeds": args.seeds, "group": args.group, **sides,
           f"{base}_mean": statistics.fmean(sides[base]), f"{new}_mean": statistics.fmean(sides[new]),
           "diff": test["diff"], "ci": [lo, hi], "p": test["p"],
           "verdict": "significant difference" if test["p"] < 0.05 else "no significant difference"}
    print(f"{new} - {base}: {res['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}] points, p = {res['p']:.3g} "
          f"(n = {args.seeds}): {res['verdict']}", file=sys.stderr)
    emit(res, args.json, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
