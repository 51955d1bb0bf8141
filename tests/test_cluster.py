"""`ray job submit` of a small study to a real Ray head (token auth, 127.0.0.1), tracked by a real
`mlflow server` (SQLite backend, 127.0.0.1); the runs are read back over MLflow's REST API."""
import os
import subprocess
import sys

import pytest
import yaml

from conftest import BIN, free_port, is_loopback, listening, rest, stop_session, wait_http

from ptmdd_ray.service import LOOPBACK_ENV

pytestmark = pytest.mark.slow


@pytest.fixture()
def cluster(tmp_path):
    # Ray on Linux swaps --node-ip-address=127.0.0.1 for the routable address unless told that
    # this is a single-machine cluster (LOOPBACK_ENV=0): then everything listens on 127.0.0.1.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONWARNINGS": "ignore", LOOPBACK_ENV: "0"}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    gcs, dash, mlflow_port = free_port(), free_port(), free_port()
    # `ray start` in a session of its own: its daemons stay in it, so the teardown stops this head
    # and nothing else (`ray stop` would stop every Ray on the machine)
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                             # fixed defaults another Ray on the machine may hold
                             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                             "--disable-usage-stats"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    _, err = head.communicate(timeout=180)
    assert head.returncode == 0, err[-2000:]
    mlflow = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{mlflow_port}/health")
        wait_http(f"http://127.0.0.1:{dash}/api/version")
        yield env, f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{mlflow_port}", head.pid, mlflow.pid
    finally:
        mlflow.terminate()
        try:
            mlflow.wait(timeout=20)
        except subprocess.TimeoutExpired:
            mlflow.kill()
        stop_session(head.pid)


def test_ray_job_submit_runs_a_study_recorded_in_an_mlflow_server(cluster, tmp_path):
    env, dashboard, mlflow_url, head_session, mlflow_session = cluster
    servers = {**listening(head_session), **listening(mlflow_session)}
    assert any(name == "gcs_server" for name in servers.values()) and len(servers) >= 5, servers
    assert all(is_loopback(a) for a in servers), {a: n for a, n in servers.items() if not is_loopback(a)}
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
