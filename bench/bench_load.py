"""Load: a study of many small trials, and many concurrent pool requests to the store actor.

    .venv/bin/python bench/bench_load.py [--trials 100] [--requests 50] [--out runs/bench_load]

Prints trials per minute of a ``--trials``-trial study on ``digits`` (tiny budgets, 2 slots, a
2-PTM pool in every trial) with the store's hit rate, checks that MLflow holds exactly one
FINISHED run per trial, and the latency percentiles of ``--requests`` concurrent ``fetch`` calls
to the store actor (all hits, then all for missing PTMs of 2 runs: single flight).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = {"dataset": {"name": "digits", "im_size": 8}, "model": "ConvNetW32",
        "distill": {"method": "dm", "ipc": 1, "iterations": 2, "batch_real": 16},
        "pool": {"archs": ["ConvNetW32"], "seeds": 2, "epoch": 1}, "pretrain": {"batch": 128},
        "loss": {"clom": 30.0}, "eval": {"runs": 1, "epochs": 2, "baseline": False}}


def load_study_of(n: int):
    """A study of n trials: n/4 CLoM weights x 4 samples (n rounded up to a multiple of 4)."""
    points = -(-n // 4)
    spec = {"name": "load", "base": BASE, "sweep": {"loss.clom": {"grid": [float(10 + i) for i in range(points)]}},
            "samples": 4, "max_concurrent": 2, "resources": {"cpu": 1, "gpu": 0}}
    return spec


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50_ms": 1000 * q[49], "p90_ms": 1000 * q[89], "p99_ms": 1000 * q[98], "max_ms": 1000 * xs[-1]}


def fetch_latencies(store: str, specs, epochs: list[int], n: int) -> list[float]:
    """Latency of each of n concurrent PTM requests, issued at once as Ray tasks the way trials
    make them (``RayRepository.get``: through the store actor, training under the store's lock
    what is missing)."""
    import ray

    @ray.remote(num_cpus=0)
    def request(spec) -> float:
        from ptmdd_ray.data import load_data
        from ptmdd_ray.pool import PTM_DATA_SEED
        from ptmdd_ray.service import RayRepository

        t0 = time.perf_counter()
        RayRepository(store).get(spec, epochs[0], epochs, lambda: load_data(spec.source, PTM_DATA_SEED))
        return time.perf_counter() - t0

    return ray.get([request.remote(specs[i % len(specs)]) for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--out", default="runs/bench_load")
    args = ap.parse_args()

    import mlflow
    import ray
    import yaml

    from ptmdd_ray.config import build_config
    from ptmdd_ray.pool import pool_specs
    from ptmdd_ray.store import CheckpointStore
    from ptmdd_ray.study import run_study
    from ptmdd_ray.study_spec import load_study

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    path = out / "load.yaml"
    path.write_text(yaml.safe_dump(load_study_of(args.trials)))
    study = load_study(path)
    store = out / "store"
    t0 = time.perf_counter()
    summary = run_study(study, store=str(store), results=str(out / "results"))
    wall = time.perf_counter() - t0
    client = mlflow.MlflowClient(summary["tracking_uri"])
    exp = client.get_run(summary["parent_run_id"]).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'", max_results=10000)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    keys = {r.data.tags["ptmdd.trial_key"] for r in finished}
    stats = CheckpointStore(store).stats()
    n = len(study.grid) * study.spec.samples
    row = {"trials": n, "finished_runs": len(finished), "distinct_trials": len(keys), "errors": summary["errors"],
           "wall_s": wall, "trials_per_minute": 60 * len(finished) / wall, "ptm_trainings": stats["trainings"],
           "ptm_hits": stats["hits"], "hit_rate": stats["hits"] / max(1, stats["hits"] + stats["trainings"])}
    assert len(finished) == len(keys) == n, row

    cfg = build_config({**BASE, "store": str(out / "store-requests")})
    specs = pool_specs(cfg)
    cold = fetch_latencies(cfg.store, specs, [1], args.requests)  # 2 missing runs: 2 trainings, the rest wait
    warm = fetch_latencies(cfg.store, specs, [1], args.requests)  # all hits
    req = {"requests": args.requests, "cold": percentiles(cold), "warm": percentiles(warm),
           "trainings": CheckpointStore(cfg.store).stats()["trainings"]}
    ray.shutdown()
    print(json.dumps({"study": row, "store_requests": req}, indent=1))


if __name__ == "__main__":
    main()
