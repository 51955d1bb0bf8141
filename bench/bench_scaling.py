"""How a DM iteration's time grows with IPC, the number of classes and the PTM pool (one process).

    .venv/bin/python bench/bench_scaling.py [--data parquet:../shared/data/cifar10-jpeg.parquet]
        [--ipcs 1,10,50] [--classes 2,5,10] [--ptms 1,2,4] [--ipc 10] [--batch-real 64] [--im-size N]

Every point is timed after warm-up iterations, in the same process, in alternating rounds (so
drifts of the machine hit all points alike), and printed as seconds per iteration and as the ratio
to the first point of its axis next to the ratio its size alone would predict (linear).
Axes: IPC 1, 10, 50 (10 classes, plain DM); classes 2, 5, 10 (IPC 10); PTMs in the CLoM pool 1, 2,
4 (IPC 10, ConvNetW32 at epoch 2, from the store, trained there first if missing), with their
cost over plain DM beside them: one PTM is drawn per step, so the pool size should cost nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"parquet:{ROOT.parent / 'shared/data/cifar10-jpeg.parquet'}")
    ap.add_argument("--store", default=str(ROOT / "ptm_store"))
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per point per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ipcs", default="1,10,50", help="the IPC axis (all classes, plain DM)")
    ap.add_argument("--classes", default="2,5,10", help="the classes axis (the first N classes, at --ipc)")
    ap.add_argument("--ptms", default="1,2,4", help="the pool-size axis (at --ipc, all classes)")
    ap.add_argument("--ipc", type=int, default=10, help="IPC of the classes and PTMs axes and of plain DM")
    ap.add_argument("--batch-real", type=int, default=64, help="real images per class per step")
    ap.add_argument("--im-size", type=int, default=0, help="resize the images to this many pixels (default: the data's)")
    args = ap.parse_args()
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731

    import torch

    from ptmdd_ray.config import build_config
    from ptmdd_ray.data import load_data
    from ptmdd_ray.methods import distill
    from ptmdd_ray.pool import PTMGuide, resolve_pool

    size = {"im_size": args.im_size} if args.im_size else {}
    full = load_data(build_config({"dataset": {"name": args.data, **size}}).dataset, 0)
    n = full.num_classes

    def point(ipc: int, classes: int, ptms: int):
        cfg = build_config({
            "dataset": {"name": args.data, **size, "classes": list(range(classes)) if classes < n else None},
            "model": "ConvNetW32",
            "distill": {"method": "dm", "ipc": ipc, "iterations": args.iters, "batch_real": args.batch_real},
            "pool": {"archs": ["ConvNetW32"] if ptms else [], "seeds": max(ptms, 1), "epoch": 2},
            "loss": {"clom": 30.0 if ptms else 0.0}, "store": args.store, "device": "cpu"})
        data = full if classes >= n else load_data(cfg.dataset, 0)
        pool = resolve_pool(cfg, data, torch.device("cpu"), progress=False)
        guide = PTMGuide.from_config(cfg.loss, pool.ptms, data, 0) or None
        distill(cfg.distill, cfg.model, data, 0, guide, progress=False)  # warm-up
        return lambda seed: distill(cfg.distill, cfg.model, data, seed, guide, progress=False).seconds / args.iters

    axes = {"ipc": [(i, n, 0) for i in ints(args.ipcs)],
            "classes": [(args.ipc, c, 0) for c in ints(args.classes)],
            "PTMs": [(args.ipc, n, k) for k in ints(args.ptms)]}
    plain_point = (args.ipc, n, 0)  # plain DM at --ipc on every class: the PTMs' "vs plain"
    runners = {p: point(*p) for p in dict.fromkeys([*(p for pts in axes.values() for p in pts), plain_point])}
    times: dict[tuple, list[float]] = {p: [] for p in runners}
    for r in range(args.rounds):
        for p, run in runners.items():
            times[p].append(run(r))
    plain = statistics.median(times[plain_point])
    print(f"{'axis':<8}{'value':>6}{'s/iter':>10}{'ratio':>8}{'linear':>8}{'vs plain':>10}")
    for axis, pts in axes.items():
        k = {"ipc": 0, "classes": 1, "PTMs": 2}[axis]
        base = statistics.median(times[pts[0]])
        for p in pts:
            t = statistics.median(times[p])
            extra = f"{t / plain:>9.2f}x" if axis == "PTMs" else ""
            print(f"{axis:<8}{p[k]:>6}{t:>10.4f}{t / base:>7.2f}x{p[k] / pts[0][k]:>7.1f}x{extra}")


if __name__ == "__main__":
    main()
