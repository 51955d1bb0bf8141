"""Latency of loading a warm PTM checkpoint from an S3 store against a local one, and of the S3
lease lock against the local flock.

    .venv/bin/python bench/bench_store.py [--repeats 100] [--arch ConvNet]

The S3 server is moto on 127.0.0.1 (started here in a process session of its own, stopped at the
end), not AWS: the figures are the store's own cost (requests, sha256, safetensors parsing) plus
loopback HTTP, a floor for a real endpoint. The checkpoint is a fresh ``--arch`` for CIFAR-10
(3x32x32, 10 classes) saved once in each store and loaded once before timing; the loads alternate
between the backends (and which goes first) so that machine drift hits both alike. Lock figures:
time to take and to release an uncontended lock (``store.lock``). Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BUCKET = "ptmdd-bench"


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=100, method="inclusive")
    ms = {"p50_ms": q[49], "p99_ms": q[98], "mean_ms": statistics.fmean(xs), "max_ms": xs[-1]}
    return {k: round(1000 * v, 3) for k, v in ms.items()}


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto_server on a free loopback port (no IAM checks) with the bench bucket."""
    import boto3

    from helpers import BIN, free_port, wait_http

    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint + "/moto-api/", timeout=60)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket=BUCKET)
    return proc, endpoint


def time_loads(stores: dict, key: str, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in stores}
    names = list(stores)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            stores[name].load(key)
            times[name].append(time.perf_counter() - t0)
    return times


def time_locks(store, repeats: int) -> dict[str, list[float]]:
    acquire, release = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with store.lock("bench") as held:
            t1 = time.perf_counter()
            assert held
        release.append(time.perf_counter() - t1)
        acquire.append(t1 - t0)
    return {"acquire": acquire, "release": release}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--arch", default="ConvNet")
    args = ap.parse_args()

    import os

    from ptmdd_ray.store import CheckpointStore
    from ptmdd_ray.train import new_model

    proc, endpoint = start_moto()
    try:
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        with tempfile.TemporaryDirectory() as tmp:
            stores = {"local": CheckpointStore(Path(tmp) / "store"), "s3": CheckpointStore(f"s3://{BUCKET}/store")}
            state = new_model(args.arch, (3, 10, 32), seed=0).state_dict()
            key = f"{args.arch}-s0-bench-e0001"
            for store in stores.values():
                meta = store.save(key, state, {"arch": args.arch})
                store.load(key)  # warm: first-use costs (connections, clients) left out
                with store.lock("bench"):
                    pass
            loads = time_loads(stores, key, args.repeats)
            locks = {name: time_locks(store, args.repeats) for name, store in stores.items()}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = {"arch": args.arch, "checkpoint_bytes": meta["bytes"], "repeats": args.repeats,
           "s3_server": "moto_server on 127.0.0.1 (not AWS)",
           "load": {name: percentiles(ts) for name, ts in loads.items()},
           "s3_over_local_p50": round(statistics.median(loads["s3"]) / statistics.median(loads["local"]), 1),
           "lock": {name: {op: percentiles(ts) for op, ts in ops.items()} for name, ops in locks.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
