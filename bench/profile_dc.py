"""Where one DC/DSA iteration's time goes: the inner loop's network training vs the matching.

    .venv/bin/python bench/profile_dc.py [--method dsa] [--compile] [--data parquet:../shared/data/cifar10-jpeg.parquet]
        [--im-size N] [--ipc 10] [--batch-real 64]

CIFAR-10, ConvNetW32, IPC 10 (10 outer steps, 9 x 50 inner epochs), batch_real 64; one warm-up
iteration, then one timed one with the inner training timed separately.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="dc", choices=["dc", "dsa"])
    ap.add_argument("--compile", action="store_true", help="distill.compile: the inner loop through torch.compile")
    ap.add_argument("--data", default=f"parquet:{ROOT.parent / 'shared/data/cifar10-jpeg.parquet'}")
    ap.add_argument("--im-size", type=int, default=0, help="resize the images to this many pixels (default: the data's)")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--batch-real", type=int, default=64, help="real images per class per matching step")
    args = ap.parse_args()

    from ptmdd_ray import methods
    from ptmdd_ray.methods import dc
    from ptmdd_ray.config import build_config
    from ptmdd_ray.data import load_data

    cfg = build_config({"dataset": {"name": args.data, **({"im_size": args.im_size} if args.im_size else {})},
                        "model": "ConvNetW32",
                        "distill": {"method": args.method, "ipc": args.ipc, "iterations": 1,
                                    "batch_real": args.batch_real, "compile": args.compile}})
    data = load_data(cfg.dataset, 0)
    inner = [0.0]
    train = dc.train_classifier

    def timed_train(*a, **k):
        t0 = time.perf_counter()
        out = train(*a, **k)
        inner[0] += time.perf_counter() - t0
        return out

    dc.train_classifier = timed_train  # this script's own process only
    methods.distill(cfg.distill, cfg.model, data, 0, progress=False)
    inner[0] = 0.0
    t0 = time.perf_counter()
    methods.distill(cfg.distill, cfg.model, data, 1, progress=False)
    total = time.perf_counter() - t0
    print(f"{args.method}{' (compiled)' if args.compile else ''}: {total:.2f} s/iter; inner-loop training {inner[0]:.2f} s ({100 * inner[0] / total:.0f} %), "
          f"matching {total - inner[0]:.2f} s")


if __name__ == "__main__":
    main()
