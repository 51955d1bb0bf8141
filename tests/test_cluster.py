"""`ray job submit` of a small study to a real Ray head (token auth, 127.0.0.1), tracked by a real
`mlflow server` (SQLite backend, 127.0.0.1); the runs are read back over MLflow's REST API."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (e.g. 401 without a token): it is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def rest(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture()
def cluster(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONWARNINGS": "ignore"}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    gcs, dash, mlflow_port = free_port(), free_port(), free_port()
    head = subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                           "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert head.returncode == 0, head.stderr[-2000:]
    mlflow = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{mlflow_port}/health")
        wait_http(f"http://127.0.0.1:{dash}/api/version")
        yield env, f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{mlflow_port}"
    finally:
        mlflow.terminate()
        try:
            mlflow.wait(timeout=20)
        except subprocess.TimeoutExpired:
            mlflow.kill()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_runs_a_study_recorded_in_an_mlflow_server(cluster, tmp_path):
    env, dashboard, mlflow_url = cluster
    work = tmp_path / "job"
    work.mkdir()
    (work / "study.yaml").write_text(yaml.safe_dump({
        "name": "submitted",
        "base": {"dataset": {"name": "digits", "im_size": 8}, "model": "ConvNetW32",
                 "distill": {"method": "dm", "ipc": 1, "iterations": 10, "batch_real": 32},
                 "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 2}, "pretrain": {"batch": 128},
                 "eval": {"runs": 2, "epochs": 20}},
        "sweep": {"loss.clom": {"grid": [0.0, 30.0]}},
        "max_concurrent": 2,
    }))
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(work), "--",
         sys.executable, "-m", "ptmdd_ray.cli", "study", "study.yaml", "--mlflow-uri", mlflow_url,
         "--results", str(tmp_path / "results"), "--store", str(tmp_path / "store")],
        env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-2000:])
    assert "succeeded" in job.stdout.lower()

    exp = rest(mlflow_url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=submitted")["experiment"]
    runs = rest(mlflow_url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]

    def tags(run):
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    parents = [r for r in runs if tags(r).get("ptmdd.role") == "study"]
    children = [r for r in runs if tags(r).get("ptmdd.role") == "trial"]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    assert len(children) == 2 and all(c["info"]["status"] == "FINISHED" for c in children)
    for c in children:
        params = {p["key"]: p["value"] for p in c["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in c["data"]["metrics"]}
        assert tags(c)["mlflow.parentRunId"] == parents[0]["info"]["run_id"]
        assert params["distill.ipc"] == "1" and params["loss.clom"] in ("0.0", "30.0")
        assert 0.0 <= metrics["acc.mean"] <= 1.0 and "distill.seconds_per_iteration" in metrics
