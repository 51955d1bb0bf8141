"""What CCLoM's real batch costs per distillation step: the PTM term alone (forward of the
synthetic set, the real batch's features, the loss, backward) at the reference's batch sizes, with
the real set's features embedded once per PTM (the default) or embedded at every step (the
reference's way), on CIFAR-10 at CPU scale (ConvNetW32 PTM, IPC 10: 100 synthetic images).

    .venv/bin/python bench/bench_cclom.py [--batches 256,2048,8192] [--steps 10]

Both ways run in one process in alternating blocks, so the ratio is free of machine drift. The
PTM's weights do not change the cost, so it is a fresh ConvNetW32 (no store needed)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_seconds(guide, syn, y, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        x = syn.clone().requires_grad_(True)
        guide(x, x, y).backward()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    from ptmdd_ray.config import DatasetConfig
    from ptmdd_ray.data import load_data
    from ptmdd_ray.pool import PTM, PTMGuide
    from ptmdd_ray.train import new_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=f"parquet:{ROOT.parent / 'shared/data/cifar10-jpeg.parquet'}")
    p.add_argument("--batches", default="256,2048,8192")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--blocks", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)  # one trial's share of a 2-core machine
    data = load_data(DatasetConfig(name=args.data))
    model = new_model("ConvNetW32", (data.channels, data.num_classes, data.im_size), seed=0,
                      channels_last=True).eval().requires_grad_(False)
    ptm = PTM("ConvNetW32", 0, 0, "bench", 0.0, model)
    syn, y = data.x_train[:100].clone(), data.y_train[:100].clone()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        cached = PTMGuide([ptm], clom=0.0, cclom=1.0, real=data, cclom_batch=batch, seed=0)
        t0 = time.perf_counter()
        cached.real_features(model, torch.zeros(1, dtype=torch.long))  # the one-off embedding of the real set
        once = time.perf_counter() - t0
        fresh = PTMGuide([ptm], clom=0.0, cclom=1.0, real=data, cclom_batch=batch, seed=0)
        fresh.FEATURE_CACHE_BYTES = 0
        times = {"cached": [], "per_step": []}
        for _ in range(args.blocks):
            times["cached"].append(step_seconds(cached, syn, y, args.steps))
            times["per_step"].append(step_seconds(fresh, syn, y, args.steps))
        row = {"cclom_batch": batch, "seconds_per_step_cached": min(times["cached"]),
               "seconds_per_step_embedding_every_step": min(times["per_step"]), "seconds_to_embed_real_set": once,
               "real_images": int(data.x_train.shape[0])}
        row["speedup"] = row["seconds_per_step_embedding_every_step"] / row["seconds_per_step_cached"]
        rows.append(row)
        print(f"cclom_batch {batch:>5}: {row['seconds_per_step_cached']:.4f} s/step with the features embedded once "
              f"({once:.1f} s for {row['real_images']} images), {row['seconds_per_step_embedding_every_step']:.4f} "
              f"s/step embedding every step: {row['speedup']:.1f}x", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
