"""What two trials wait for a pool that is not in the store yet: its PTMs trained side by side
(each trial takes the runs no one else is training first, :func:`ptmdd_ray.pool.fetch_runs`)
against one after the other (one trial trains them all while the other waits, which is what a
pool cost before: the second trial's wait is the first trial's whole training).

    .venv/bin/python bench/bench_pool_train.py [--data digits] [--im-size 16] [--train-per-class 150]
        [--ptms 2] [--epochs 30] [--repeats 3] [--json] [--out FILE]

Each repeat times, in a fresh local store, two processes resolving the same ``--ptms`` pool at once
(side by side), and one process resolving it alone (one after the other), in alternating order so
that machine drift hits both alike; one thread per process, timed from a common start signal once
every process has imported and loaded its data. The speed-up tends to the number of
trials that share the pool (here 2) on as many idle cores, less each process's own compilation of
the PTM's forward (paid once per process: the defaults train long enough for it not to dominate);
on a busy machine it is less.
Prints a table on stderr and, with ``--json``, one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from emit import emit  # noqa: E402 - bench/ is on the path (the script's own folder)


def config(args: argparse.Namespace, store: str) -> dict:
    return {"dataset": {"name": args.data, "im_size": args.im_size, "train_per_class": args.train_per_class},
            "model": args.arch, "pool": {"archs": [args.arch], "seeds": args.ptms, "epoch": args.epochs},
            "pretrain": {"epochs": args.epochs}, "store": store}


def resolve(spec: dict, ready, go, out) -> None:
    """One trial's pool resolution, in a process of its own, started on ``go`` once every trial
    has imported and loaded its data: what it trained and reused."""
    import torch

    from ptmdd_ray.config import build_config
    from ptmdd_ray.data import load_data
    from ptmdd_ray.pool import resolve_pool

    torch.set_num_threads(1)
    cfg = build_config(spec)
    data = load_data(cfg.dataset)
    ready.put(True)
    go.wait()
    pool = resolve_pool(cfg, data, torch.device("cpu"), progress=False)
    out.put((pool.trainings, pool.hits, time.perf_counter()))


def time_trials(spec: dict, trials: int) -> tuple[float, list[tuple[int, int, float]]]:
    """Wall seconds from the start signal until ``trials`` processes resolving ``spec``'s pool at
    once all have it (process start, imports and data loading are left out)."""
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=resolve, args=(spec, ready, go, out)) for _ in range(trials)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    t0 = time.perf_counter()
    go.set()
    counts = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"bench_pool_train: a resolving process exited {[p.exitcode for p in procs]}")
    return max(c[2] for c in counts) - t0, counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--im-size", type=int, default=16)
    p.add_argument("--train-per-class", type=int, default=150)
    p.add_argument("--arch", default="ConvNetW32")
    p.add_argument("--ptms", type=int, default=2, help="PTMs in the pool (pool.seeds)")
    p.add_argument("--epochs", type=int, default=30, help="pretraining epochs of each PTM")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    sides: dict[str, list[float]] = {"side_by_side": [], "one_after_the_other": []}
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            with tempfile.TemporaryDirectory() as tmp:
                trials = 2 if side == "side_by_side" else 1
                seconds, counts = time_trials(config(args, f"{tmp}/store"), trials)
                if sum(c[0] for c in counts) != args.ptms:  # every PTM trained once, by one of the trials
                    raise SystemExit(f"bench_pool_train: {side} trained {counts}, not {args.ptms} PTMs once")
                sides[side].append(seconds)
    mean = {k: statistics.fmean(v) for k, v in sides.items()}
    result = {"settings": vars(args) | {"json": None, "out": None}, "seconds": sides,
              "mean_s": mean, "speedup": mean["one_after_the_other"] / mean["side_by_side"]}
    print(f"pool of {args.ptms} x {args.arch}, {args.epochs} epochs on {args.data}: both trials have it after "
          f"{mean['side_by_side']:.1f} s side by side, {mean['one_after_the_other']:.1f} s one after the other: "
          f"{result['speedup']:.2f}x", file=sys.stderr)
    emit(result, args.json, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
