"""What the study service saves, measured on real studies on the local Ray (a benchmark, not a test).

    .venv/bin/python bench/bench_study.py [--studies diversity epochs] [--samples 1] [--out runs/bench_study]

Prints, per shipped study (run at its CPU scale on ``digits`` with a fresh checkpoint store):
- PTM trainings done (the store's counter) vs. what the trials would have trained each on its own
  (the sum over trials of the PTM runs in their pools);
- scheduling: study wall time vs. the sum of trial times (MLflow run start to end) divided by the
  parallel slots (``max_concurrent``); efficiency = that ideal / wall; the rest is Ray, Tune,
  MLflow and the PTM trainings the trials waited for;
- throughput: trials per hour of the ``epochs`` study at 1 and 2 concurrent trials on the warm
  store (no trainings), and the share of wall time outside trial work;
- memory (``--memory``): mean per-trial peak RSS and private memory of a tiny CIFAR-10 study
  (the Parquet, ~740 MB of float tensors) with the data set shared through the object store vs.
  loaded in every trial.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(study, out: Path, store: Path, name: str, share_data: bool = True) -> dict:
    import mlflow

    from ptmdd_ray.study import run_study

    results = out / name
    shutil.rmtree(results, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_study(study, store=str(store), results=str(results), share_data=share_data)
    wall = time.perf_counter() - t0
    client = mlflow.MlflowClient(summary["tracking_uri"])
    runs = client.search_runs([client.get_run(summary["parent_run_id"]).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}' and "
                              "attributes.status = 'FINISHED'", max_results=10000)
    trial_s = [(r.info.end_time - r.info.start_time) / 1000 for r in runs]
    slots = study.spec.max_concurrent
    return {"trials": len(runs), "errors": summary["errors"], "wall_s": wall, "trial_s": sum(trial_s),
            "efficiency": sum(trial_s) / slots / wall, "outside_share": 1 - sum(trial_s) / (slots * wall),
            "trials_per_hour": 3600 * len(runs) / wall,
            "peak_rss_mb": statistics.fmean(r.data.metrics.get("mem.peak_rss_mb", float("nan")) for r in runs),
            "private_mb": statistics.fmean(r.data.metrics.get("mem.private_mb", float("nan")) for r in runs)}


def per_trial_trainings(study) -> int:
    """PTM runs the trials would train if each had its own store (one per (arch, seed) of its pool)."""
    from ptmdd_ray.config import uses_ptms
    from ptmdd_ray.pool import pool_specs

    return sum(len(pool_specs(cfg)) for point in study.grid for s in range(study.spec.samples)
               if uses_ptms(cfg := study.trial_config(point, s)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", nargs="+", default=["diversity", "epochs"])
    ap.add_argument("--samples", type=int, default=1, help="samples per grid point (the shipped files use 3)")
    ap.add_argument("--set", action="append", default=[], help="extra study overrides, key=value")
    ap.add_argument("--out", default="runs/bench_study")
    ap.add_argument("--memory", action="store_true", help="only the shared vs per-trial memory comparison")
    ap.add_argument("--data", default="parquet:../shared/data/cifar10-jpeg.parquet")
    args = ap.parse_args()

    import ray

    from ptmdd_ray.store import CheckpointStore
    from ptmdd_ray.study import load_study

    out = Path(args.out).resolve()
    rows = {}
    if args.memory:
        sets = [f"base.dataset.name={args.data}", "base.distill.iterations=5", "base.distill.ipc=10",
                "base.eval.epochs=2", "base.eval.runs=3", "base.eval.baseline=false", "base.dataset.im_size=32",
                "samples=2", "max_concurrent=2", "name=memory"]
        study = load_study(ROOT / "studies" / "quickstart.yaml", sets + args.set)
        study = replace(study, grid=study.grid[:1])
        for shared in (True, False):
            rows[f"memory shared={shared}"] = run(study, out, out / "store-mem", f"mem-{shared}", share_data=shared)
    else:
        for name in args.studies:
            store = out / f"store-{name}"
            shutil.rmtree(store, ignore_errors=True)
            study = load_study(ROOT / "studies" / f"{name}.yaml", [f"samples={args.samples}", *args.set])
            r = run(study, out, store, name)
            r["ptm_trainings"] = CheckpointStore(store).stats()["trainings"]
            r["ptm_trainings_per_trial"] = per_trial_trainings(study)
            rows[name] = r
        study = load_study(ROOT / "studies" / "epochs.yaml", [f"samples={args.samples}", *args.set])
        for slots in (1, 2):
            one = replace(study, spec=replace(study.spec, max_concurrent=slots))
            rows[f"epochs warm, {slots} slot(s)"] = run(one, out, out / "store-epochs", f"epochs-{slots}")
    ray.shutdown()
    print(json.dumps(rows, indent=1))
    print("\n| run | trials | wall s | sum trial s | efficiency | outside trials | trials/h | PTM trainings "
          "(per-trial) | peak RSS MB | private MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        ptm = f"{r['ptm_trainings']} ({r['ptm_trainings_per_trial']})" if "ptm_trainings" in r else "-"
        print(f"| {k} | {r['trials']} | {r['wall_s']:.0f} | {r['trial_s']:.0f} | {r['efficiency']:.2f} | "
              f"{100 * r['outside_share']:.0f} % | {r['trials_per_hour']:.0f} | {ptm} | {r['peak_rss_mb']:.0f} | "
              f"{r['private_mb']:.0f} |")


if __name__ == "__main__":
    main()
