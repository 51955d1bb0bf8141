"""Study throughput on one node with 2 CPUs vs two worker nodes with 1 CPU each (same machine).

Each layout is brought up with docker/local_cluster.sh (a head that takes no trials plus the worker
nodes; no S3/PostgreSQL/MLflow: the store and the results are local, as on a shared file system),
the same study runs on it through `ptmdd study --address`, and the figures come back from MLflow:

- trials/hour: finished trials over the study's wall time;
- scheduling efficiency: the trials' summed run time over (wall time x trial slots), i.e. how much
  of the cluster's trial capacity held a running trial;
- object-store MiB per node: the largest `objstore.node_mb` a trial on that node saw while it held
  the data set (one copy per node, whatever the number of trials there), beside the data set's size.

    .venv/bin/python bench/bench_cluster.py [--samples 2] [--out runs/bench_cluster]
        [--iterations 200] [--eval-epochs 50] [--im-size 16] [--grid 0,10,30,100]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STUDY = {
    "name": "throughput",
    "base": {"dataset": {"name": "digits", "im_size": 16}, "model": "ConvNetW32",
             "distill": {"method": "dm", "ipc": 1, "iterations": 200, "batch_real": 64},
             "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 2}, "pretrain": {"batch": 128},
             "eval": {"runs": 1, "epochs": 50}},
    "sweep": {"loss.clom": {"grid": [0.0, 10.0, 30.0, 100.0]}},
    "resources": {"cpu": 1, "gpu": 0},
    "max_concurrent": 2,
}


def study_of(args) -> dict:
    """STUDY at the command line's size (its defaults: STUDY as it is)."""
    base = {**STUDY["base"], "dataset": {**STUDY["base"]["dataset"], "im_size": args.im_size},
            "distill": {**STUDY["base"]["distill"], "iterations": args.iterations},
            "eval": {**STUDY["base"]["eval"], "epochs": args.eval_epochs}}
    grid = [float(v) for v in args.grid.split(",") if v.strip()]
    return {**STUDY, "base": base, "sweep": {"loss.clom": {"grid": grid}}}


def run_layout(out: Path, store: Path, workers: int, cpus: int, samples: int, spec: dict = STUDY) -> dict:
    where = out / f"{workers}x{cpus}"
    env = {**os.environ, "PYTHON": sys.executable, "WORKERS": str(workers), "WORKER_CPUS": str(cpus),
           "WORKER_GPUS": "0", "S3": "0", "POSTGRES": "0", "MLFLOW": "0"}
    script = ROOT / "docker" / "local_cluster.sh"
    subprocess.run(["bash", str(script), "up", str(where)], env=env, check=True, capture_output=True, timeout=600)
    try:
        gcs = next(line.split("=", 1)[1] for line in (where / "cluster.env").read_text().splitlines()
                   if line.startswith("export RAY_GCS_ADDRESS="))
        study = where / "study.yaml"
        study.write_text(yaml.safe_dump({**spec, "samples": samples}))
        env_run = {**env, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        t0 = time.perf_counter()
        proc = subprocess.run([str(BIN / "ptmdd"), "study", str(study), "--address", gcs, "--results",
                               str(where / "results"), "--store", str(store)], env=env_run,
                              capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        subprocess.run(["bash", str(script), "down", str(where)], env=env, capture_output=True, timeout=300)
    return summarize(where / "results", wall, slots=workers * cpus)


def summarize(results: Path, wall: float, slots: int) -> dict:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("throughput")
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("ptmdd.role") == "trial"
              and r.info.status == "FINISHED"]
    busy = sum((r.info.end_time - r.info.start_time) / 1000 for r in trials)
    per_node: dict[str, float] = {}
    for r in trials:
        node = r.data.tags["ray.node_id"][:8]
        per_node[node] = max(per_node.get(node, 0.0), r.data.metrics.get("objstore.node_mb", 0.0))
    return {"trials": len(trials), "wall_s": round(wall, 1), "trials_per_hour": round(3600 * len(trials) / wall, 1),
            "scheduling_efficiency": round(busy / (wall * slots), 3), "objstore_mb_per_node": per_node}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_cluster")
    ap.add_argument("--iterations", type=int, default=STUDY["base"]["distill"]["iterations"], help="DM iterations per trial")
    ap.add_argument("--eval-epochs", type=int, default=STUDY["base"]["eval"]["epochs"], help="epochs per evaluation model")
    ap.add_argument("--im-size", type=int, default=STUDY["base"]["dataset"]["im_size"], help="digits resized to this")
    ap.add_argument("--grid", default=",".join(str(v) for v in STUDY["sweep"]["loss.clom"]["grid"]),
                    help="the CLoM weights swept (comma-separated)")
    args = ap.parse_args()
    spec = study_of(args)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    from ptmdd_ray.config import build_config
    from ptmdd_ray.data import load_data

    arrays = load_data(build_config(spec["base"]).dataset, 0).to_arrays()
    data_mb = sum(getattr(a, "nbytes", 0) for a in arrays.values()) / 2**20 if isinstance(arrays, dict) else None
    # a warm-up study trains the PTM into the shared store first, so neither layout pays for it
    run_layout(out / "warmup", out / "store", 1, 2, 1, spec)
    rows = {"1 node x 2 CPUs": run_layout(out, out / "store", 1, 2, args.samples, spec),
            "2 nodes x 1 CPU": run_layout(out, out / "store", 2, 1, args.samples, spec)}
    print(json.dumps({"data_set_mb": data_mb, "layouts": rows}, indent=1))


if __name__ == "__main__":
    main()
