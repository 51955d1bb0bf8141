"""Does a faster distillation path change the accuracy of the sets it makes? The same trial
distilled both ways with the same seeds, each set evaluated identically, paired by seed (issue 23:
no accuracy is traded). ``--compare precision``: compiled DM in fp32 against compiled DM under
``precision: bf16-cpu`` (its network passes in bf16, :func:`ptmdd_ray.methods.pass_precision`);
``--compare compile``: eager against ``distill.compile`` (any method, fp32).

    .venv/bin/python bench/pair_distill.py [--compare precision|compile] [--method dm|dc|dsa]
        [--data parquet:../shared/data/cifar10-jpeg.parquet] [--train-per-class 500] [--val-per-class 200]
        [--model ConvNetW32]
        [--ipc 10] [--iterations 200] [--batch-real 64] [--clom 2000] [--ptm-epochs 2]
        [--runs 3] [--epochs 300] [--seeds 5] [--rows FILE] [--json] [--out FILE]

A trial: the 2-PTM pool (``--model``, ``--ptm-epochs`` epochs, trained once into a temporary
store), ``--method`` with CLoM at ``--clom`` (0: unguided) for ``--iterations`` iterations, from
seed s. Both sides' sets are evaluated by :func:`ptmdd_ray.evaluate.evaluate_set` with seed s and
the same settings (``--runs`` x ``--epochs``, compiled, ``bf16-cpu`` where the CPU has native bf16:
BENCHMARKS.md pairs it with fp32). 200 training images per class are held out: the verdict reads
the validation accuracy (it decides a default), the test accuracy is reported beside it. The
sample size is ``--seeds``, fixed before the run. Reported per seed and side: validation and test
accuracy; the paired difference (second side minus first) with its 95 % t-interval and p, per
split, and the verdict on validation ("no significant difference" if p >= 0.05).

A pairing at study scale takes hours: with ``--rows FILE`` each finished (seed, side) is written
to FILE as it ends (JSON, replaced atomically), and a second call with the same settings goes on
from there, so that an interrupted run loses only the trial it was in. A rows file of other
settings is refused in one line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from emit import emit  # noqa: E402 - bench/ is on the path (the script's own folder)

# each comparison's two sides, the baseline first: (name, distill settings, run precision)
SIDES = {"precision": (("fp32", {"compile": True}, "fp32"), ("bf16-cpu", {"compile": True}, "bf16-cpu")),
         "compile": (("eager", {"compile": False}, "fp32"), ("compiled", {"compile": True}, "fp32"))}


def config(args, store: str, settings: dict, precision: str):
    from ptmdd_ray.config import build_config

    guided = args.clom > 0
    return build_config({
        "dataset": {"name": args.data, "train_per_class": args.train_per_class, "val_per_class": args.val_per_class,
                    **({"im_size": args.im_size} if args.im_size else {})},
        "model": args.model,
        "distill": {"method": args.method, "ipc": args.ipc, "iterations": args.iterations,
                    "batch_real": args.batch_real, **settings},
        **({"pool": {"archs": [args.model], "seeds": 2, "epoch": args.ptm_epochs}} if guided else {}),
        "loss": {"clom": args.clom},
        "eval": {"runs": args.runs, "epochs": args.epochs, "compile": True},
        "store": store, "device": "cpu", "precision": precision})


def trial(args, store: str, seed: int, settings: dict, precision: str, data, ptms: list) -> dict[str, float]:
    """One side's set from seed ``seed`` guided by ``ptms`` (the same for both sides), scored on
    validation and test (percent)."""
    from dataclasses import replace

    from ptmdd_ray.evaluate import evaluate_set
    from ptmdd_ray.methods import distill
    from ptmdd_ray.pool import PTMGuide
    from ptmdd_ray.train import cpu_has_bf16

    cfg = replace(config(args, store, settings, precision), seed=seed)
    guide = PTMGuide.from_config(cfg.loss, ptms, data, seed) if ptms else None
    syn = distill(cfg.distill, cfg.model, data, seed, guide, progress=False, precision=precision)
    scores = evaluate_set(syn.images, syn.labels, data, cfg.eval, seed, progress=False, splits=("val", "test"),
                          precision="bf16-cpu" if cpu_has_bf16() else "fp32")
    return {split: 100 * scores[split][cfg.model]["mean"] for split in ("val", "test")}


def verdict(sides: dict[str, list[dict]], base: str, new: str, split: str) -> dict:
    from ptmdd_ray.stats import paired

    test = paired({i: r[split] for i, r in enumerate(sides[new])}, {i: r[split] for i, r in enumerate(sides[base])})
    lo, hi = test["ci"] if test and test["ci"] else (float("nan"), float("nan"))
    return {"diff": test["diff"] if test else float("nan"), "ci": [lo, hi], "p": test["p"] if test else float("nan"),
            f"{base}_mean": statistics.fmean(r[split] for r in sides[base]),
            f"{new}_mean": statistics.fmean(r[split] for r in sides[new])}


def load_rows(path: str | None, settings: dict) -> dict[str, dict[str, dict]]:
    """The (side -> seed -> accuracies) rows an earlier call with these ``settings`` finished
    (none without ``path`` or before the first); other settings are an error, not a mix."""
    if not path or not Path(path).exists():
        return {}
    saved = json.loads(Path(path).read_text())
    if saved["settings"] != settings:
        changed = sorted(k for k in {**settings, **saved["settings"]} if settings.get(k) != saved["settings"].get(k))
        raise SystemExit(f"pair_distill.py: error: --rows {path}: written with other settings ({', '.join(changed)})")
    return saved["rows"]


def save_rows(path: str | None, settings: dict, rows: dict[str, dict[str, dict]]) -> None:
    if path:
        from ptmdd_ray.artifacts import write_atomic

        write_atomic(path, json.dumps({"settings": settings, "rows": rows}, indent=1).encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", choices=sorted(SIDES), default="precision", help="which two paths to pair")
    p.add_argument("--method", choices=["dm", "dc", "dsa"], default="dm")
    p.add_argument("--data", default=f"parquet:{ROOT.parent / 'shared/data/cifar10-jpeg.parquet'}")
    p.add_argument("--im-size", type=int, default=0)
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--val-per-class", type=int, default=200)
    p.add_argument("--model", default="ConvNetW32")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--batch-real", type=int, default=64)
    p.add_argument("--clom", type=float, default=2000.0, help="CLoM weight (0: no pool, plain method)")
    p.add_argument("--ptm-epochs", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rows", help="write each finished trial here, and go on from the trials it holds")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "out", "rows")}
    done = load_rows(args.rows, settings)

    from ptmdd_ray.data import load_data
    from ptmdd_ray.pool import resolve_pool

    (base, *_), (new, *_) = SIDES[args.compare]
    sides: dict[str, list[dict]] = {base: [], new: []}
    with tempfile.TemporaryDirectory() as store:
        cfg = config(args, store, {}, "fp32")
        data = load_data(cfg.dataset, 0)
        left = any(str(seed) not in done.get(side, {}) for seed in range(args.seeds) for side in sides)
        ptms = resolve_pool(cfg, data, data.x_train.device, progress=False).ptms if args.clom > 0 and left else []
        for seed in range(args.seeds):
            for side, side_settings, precision in SIDES[args.compare]:
                if str(seed) not in done.get(side, {}):
                    done.setdefault(side, {})[str(seed)] = trial(args, store, seed, side_settings, precision, data,
                                                                 ptms)
                    save_rows(args.rows, settings, done)
                sides[side].append(done[side][str(seed)])
            print(f"seed {seed}: " + ", ".join(f"{s} val {sides[s][-1]['val']:.2f} % test {sides[s][-1]['test']:.2f} %"
                                                for s in sides), file=sys.stderr)
    by_split = {split: verdict(sides, base, new, split) for split in ("val", "test")}
    val = by_split["val"]
    res = {"compare": args.compare, "sides": [base, new], "settings": {k: v for k, v in settings.items()
                                                                         if k != "compare"},
           **sides, **by_split,
           "verdict": "significant difference" if val["p"] < 0.05 else "no significant difference"}
    for split, v in by_split.items():
        print(f"{split}: {new} - {base}: {v['diff']:+.2f} [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}] points, "
              f"p = {v['p']:.3g} (n = {args.seeds})", file=sys.stderr)
    print(f"verdict (validation): {res['verdict']}", file=sys.stderr)
    emit(res, args.json, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
