"""The README's cluster path, for real, on one machine: `docker/local_cluster.sh up` starts a Ray head
that takes no trials and two worker nodes (own ports and temp dirs, `--num-gpus 1` so that Ray
schedules by GPU while torch stays on the CPU), an S3 server (moto), PostgreSQL and an MLflow server
on PostgreSQL with its artifacts in the bucket, all on 127.0.0.1 with Ray's token auth. Studies go
in with `ray job submit` (or `ptmdd study --address`), keep the PTM store and Tune's experiment in
the bucket, and lose a node on the way; the runs are read back over MLflow's REST API."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import BIN, TINY_BASE, is_loopback, listening, rest, session_pids, stop_session

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docker" / "local_cluster.sh"
# What README "On a Ray cluster" submits, with the study file of the test in place of the README's.
SUBMIT = ("ray job submit --working-dir . -- ptmdd study {study} --mlflow-uri $MLFLOW_TRACKING_URI "
          "--store s3://$BUCKET/ptm_store --results s3://$BUCKET/studies")
SEARCH = ("ptmdd search {study} --trials {trials} --address $RAY_GCS_ADDRESS --mlflow-uri $MLFLOW_TRACKING_URI "
          "--optuna-storage $PG_URL --store s3://$BUCKET/ptm_store --results s3://$BUCKET/studies")

STUDY = {
    "metric": "val.acc.mean",
    "name": "cluster",
    "base": {**TINY_BASE, "eval": {"runs": 1, "epochs": 10}},
    "sweep": {"loss.clom": {"grid": [0.0, 30.0]}},
    "samples": 2,
    "resources": {"cpu": 1, "gpu": 0.5},
    "max_concurrent": 4,  # two trials per worker node: every GPU slot taken, cold store
}


def _shell_env(env_file: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONWARNINGS": "ignore"}
    for line in env_file.read_text().splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The README's one-machine stack, up for the module (a node-loss test goes last)."""
    where = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "PYTHON": sys.executable, "WORKERS": "2", "WORKER_CPUS": "2", "WORKER_GPUS": "1"}
    up = subprocess.run(["bash", str(SCRIPT), "up", str(where)], env=env, capture_output=True, text=True,
                        timeout=400)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        yield where, _shell_env(where / "cluster.env")
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", str(where)], env=env, capture_output=True, timeout=300)
        left = [f.name for f in (where / "pids").iterdir()] if (where / "pids").exists() else []
        assert not left, f"local_cluster.sh down left {left} running"


def _nodes(env) -> dict[str, dict]:
    """{node id: ray list nodes' record} from the cluster's state API (RAY_ADDRESS: the dashboard)."""
    out = subprocess.run([str(BIN / "ray"), "list", "nodes", "--format", "json"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return {n["node_id"]: n for n in json.loads(out.stdout)}


def _runs(env, name: str) -> tuple[list[dict], list[dict]]:
    base = env["MLFLOW_TRACKING_URI"]
    exp = rest(base, f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")["experiment"]
    runs = rest(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                      "max_results": 1000})["runs"]
    role = {"study": [], "trial": []}
    for r in runs:
        r["tags"] = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
        r["metrics"] = {m["key"]: m["value"] for m in r["data"].get("metrics", [])}
        role[r["tags"]["ptmdd.role"]].append(r)
    return role["study"], role["trial"]


def _s3(env):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


def _keys(env, prefix: str) -> list[str]:
    pages = _s3(env).get_paginator("list_objects_v2").paginate(Bucket=env["BUCKET"], Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _store_stats(env, prefix: str) -> dict:
    out = subprocess.run([str(BIN / "ptmdd"), "store", "stats", "--json", "--store", f"s3://{env['BUCKET']}/{prefix}"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_every_server_of_the_stack_listens_on_the_loopback_only(cluster):
    where, env = cluster
    sessions = [int(f.read_text()) for f in (where / "pids").iterdir()]
    servers = {a: n for s in sessions for a, n in listening(s).items()}
    names = set(servers.values())
    assert {"gcs_server", "raylet", "postgres"} <= names and len(servers) >= 15, servers
    assert all(is_loopback(a) for a in servers), {a: n for a, n in servers.items() if not is_loopback(a)}


def test_a_submitted_study_runs_on_both_workers_with_the_store_and_tune_in_the_bucket(cluster, tmp_path):
    where, env = cluster
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    cmd = SUBMIT.format(study="study.yaml")
    readme = (ROOT / "README.md").read_text()
    assert SUBMIT.format(study="studies/quickstart.yaml") in readme  # the README says what is tested here
    job = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, (job.stdout[-4000:], job.stderr[-2000:])
    assert "study cluster: 4 trials, 0 failed" in job.stdout
    assert "4 trial(s) but torch saw no CUDA device there: they ran on the CPU" in job.stdout  # said once

    nodes = _nodes(env)
    head = next(i for i, n in nodes.items() if n["is_head_node"])
    parents, trials = _runs(env, "cluster")
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    assert len(trials) == 4 and all(t["info"]["status"] == "FINISHED" for t in trials)
    ran_on = {t["tags"]["ray.node_id"] for t in trials}
    assert len(ran_on) == 2 and head not in ran_on and ran_on <= set(nodes)  # both workers, not the head
    assert {t["tags"]["ray.gpu_ids"] for t in trials} == {"0"}  # each worker's one GPU, shared by 2 trials
    store_nodes = {t["tags"]["ptmdd.store_node"] for t in trials}
    assert len(store_nodes) == 1 and store_nodes <= set(nodes)
    assert any(t["tags"]["ray.node_id"] not in store_nodes for t in trials)  # served across nodes
    for t in trials:
        assert t["metrics"]["objstore.node_mb"] > 0 and 0 <= t["metrics"]["acc.mean"] <= 1

    stats = _store_stats(env, "ptm_store")
    assert stats["trainings"] == 1  # one PTM, trained once for 2 trials that use it
    # what it cost, read back from MLflow and the bucket: one CLoM trial trained the PTM, both pay
    # half of its price (the two CLoM trials share it), the plain trials nothing
    (ptm,) = stats["ptms"]
    clom = [t["metrics"] for t in trials if t["tags"]["ptmdd.run_name"].startswith("clom=30")]
    assert len(clom) == 2 and sorted(m["cost.ptm_train.wall_s"] > 0 for m in clom) == [False, True]
    for m in clom:
        assert m["cost.pool.wall_s"] == pytest.approx(ptm["train_wall_s"])
        assert m["cost.pool_amortised.wall_s"] == pytest.approx(ptm["train_wall_s"] / 2)
    assert sum(m["cost.store_bytes"] for m in clom) == ptm["bytes"] == stats["bytes"]
    assert all(t["metrics"]["cost.pool.wall_s"] == 0 for t in trials if t["tags"]["ptmdd.run_name"].startswith("clom=0"))
    assert any(k.startswith("studies/cluster/") for k in _keys(env, "studies/"))  # Tune's experiment
    checkpoints = {}  # trial -> its checkpoint folders left in the bucket: the last one only
    for key in _keys(env, "studies/cluster/"):
        parts = key.split("/")
        if len(parts) > 4 and parts[3].startswith("checkpoint_"):
            checkpoints.setdefault(parts[2], set()).add(parts[3])
    assert len(checkpoints) == 4 and all(len(c) == 1 for c in checkpoints.values()), checkpoints
    assert any(k.endswith("synthetic.parquet") for k in _keys(env, "mlflow/"))  # MLflow artifacts
    assert any(k.startswith("ptm_store/ptm/") and k.endswith(".safetensors") for k in _keys(env, "ptm_store/"))


def test_a_killed_driver_resumes_from_the_bucket(cluster, tmp_path):
    """SIGKILL a driver joined to the cluster mid-study; `--resume` restores the Tune experiment
    from the bucket, continues the MLflow parent run and runs only the unfinished trials."""
    where, env = cluster
    study = {**STUDY, "name": "resumed", "max_concurrent": 1,
             "sweep": {"loss.clom": {"grid": [0.0, 10.0, 30.0]}}, "samples": 1}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    cmd = [str(BIN / "ptmdd"), "study", "study.yaml", "--address", env["RAY_GCS_ADDRESS"], "--mlflow-uri",
           env["MLFLOW_TRACKING_URI"], "--store", f"s3://{env['BUCKET']}/ptm_store",
           "--results", f"s3://{env['BUCKET']}/studies"]
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 600
        while time.time() < end and driver.poll() is None:
            try:
                if any(t["info"]["status"] == "FINISHED" for t in _runs(env, "resumed")[1]):
                    break
            except Exception:  # noqa: BLE001 - the experiment is not created yet
                pass
            time.sleep(1)
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        stop_session(driver.pid)
    finished_before = {t["info"]["run_id"] for t in _runs(env, "resumed")[1] if t["info"]["status"] == "FINISHED"}
    again = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 trials, 0 failed" in again.stdout
    parents, trials = _runs(env, "resumed")
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"  # the same parent, continued
    finished = [t for t in trials if t["info"]["status"] == "FINISHED"]
    assert len(finished) == 3 and len({t["tags"]["ptmdd.trial_key"] for t in finished}) == 3
    assert finished_before <= {t["info"]["run_id"] for t in finished}  # not run again
    assert not [t for t in trials if t["info"]["status"] == "RUNNING"]


def test_two_searches_at_once_on_the_cluster_share_one_optuna_study_in_postgresql(cluster, tmp_path):
    """README's distributed search: two drivers run `ptmdd search` on one Optuna study in the
    stack's PostgreSQL at the same time; it ends with exactly both trial counts COMPLETE."""
    import optuna

    where, env = cluster
    study = {**STUDY, "name": "searched", "search": {"loss.clom": {"loguniform": [1.0, 100.0]}},
             "second_objective": "cost.seconds"}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    cmds = [SEARCH.format(study="study.yaml", trials=n) for n in (2, 3)]
    assert SEARCH.format(study="studies/loss_weights.yaml", trials=8) in (ROOT / "README.md").read_text()
    procs = [subprocess.Popen(["bash", "-c", c], cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    try:
        outs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            stop_session(p.pid)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    searched = optuna.load_study(study_name="searched", storage=env["PG_URL"])
    trials = searched.trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    parents, runs = _runs(env, "searched")
    assert len(parents) == 2 and sorted(len([r for r in runs if r["tags"]["mlflow.parentRunId"] == p["info"]["run_id"]])
                                        for p in parents) == [2, 3]
    # two objectives, in PostgreSQL: each trial told its MLflow run's accuracy and cost
    assert [d.name for d in searched.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in trials:
        (run,) = [r for r in runs if float({p["key"]: p["value"] for p in r["data"]["params"]}["loss.clom"])
                  == pytest.approx(t.params["loss.clom"])]
        assert t.values == [run["metrics"]["val.acc.mean"], run["metrics"]["cost.seconds"]]
    from ptmdd_ray.tracking import redact

    assert all(p["tags"]["ptmdd.optuna_storage"] == redact(env["PG_URL"]) for p in parents)  # never a password
    reports = [k for k in _keys(env, "mlflow/") if k.endswith("report/optuna_pareto_front.png")]
    assert len(reports) == 2  # each driver's report, in the bucket, read from PostgreSQL


def test_losing_a_worker_node_mid_study_loses_no_work(cluster, tmp_path):
    """SIGKILL worker node 2 (raylet, agents, workers) while it runs trials: they are retried on
    node 1, every trial ends with exactly one FINISHED run, none is left RUNNING, and the PTM is
    trained once. Runs last: the cluster has one worker left afterwards."""
    where, env = cluster
    study = {**STUDY, "name": "nodeloss", "samples": 3, "max_failures": 3,
             "base": {**STUDY["base"], "distill": {**STUDY["base"]["distill"], "iterations": 60}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    # the worker node that hosts the store actor (created by the first trial that needed it), so
    # that the actor has to be restarted on the other node and recover from the bucket
    actor_node = _store_actor_node(env)
    workers = {_worker_node_id(where, n): n for n in (1, 2)}
    number = workers.get(actor_node, 2)
    victim = _worker_node_id(where, number)
    driver = subprocess.Popen(["bash", "-c", SUBMIT.format(study="study.yaml")], cwd=tmp_path, env=env,
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.time() + 600
        while time.time() < end and driver.poll() is None:
            try:
                running = [t for t in _runs(env, "nodeloss")[1] if t["info"]["status"] == "RUNNING"]
            except Exception:  # noqa: BLE001 - not created yet
                running = []
            if any(t["tags"].get("ray.node_id") == victim for t in running):
                break
            time.sleep(0.5)
        kill = subprocess.run(["bash", str(SCRIPT), "kill-node", str(number), str(where)], capture_output=True,
                              text=True)
        assert kill.returncode == 0, kill.stderr
        out, _ = driver.communicate(timeout=900)
    finally:
        stop_session(driver.pid)
    assert driver.returncode == 0, out[-4000:]
    assert "study nodeloss: 6 trials, 0 failed" in out
    _, trials = _runs(env, "nodeloss")
    finished = [t for t in trials if t["info"]["status"] == "FINISHED"]
    assert len(finished) == 6 and len({t["tags"]["ptmdd.trial_key"] for t in finished}) == 6
    assert not [t for t in trials if t["info"]["status"] == "RUNNING"]
    assert any(t["tags"]["ray.node_id"] == victim and t["info"]["status"] == "FAILED" for t in trials)
    if actor_node == victim:  # restarted on the surviving worker, serving from the bucket
        assert any(t["tags"]["ptmdd.store_node"] != victim for t in finished)
    assert _store_stats(env, "ptm_store")["trainings"] == 1  # the study's one PTM, from the first test


def _store_actor_node(env) -> str | None:
    """The node of the PTM store's actor (namespace ptmdd), from the cluster's state API."""
    out = subprocess.run([str(BIN / "ray"), "list", "actors", "--format", "json", "--filter", "state=ALIVE"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return next((a["node_id"] for a in json.loads(out.stdout) if a.get("class_name") == "StoreActor"), None)


def _worker_node_id(where: Path, n: int) -> str:
    """The Ray node id of worker node ``n`` of docker/local_cluster.sh (from its raylet's command line)."""
    for pid in session_pids(int((where / "pids" / f"ray-worker-{n}").read_text()), "raylet"):
        for arg in Path(f"/proc/{pid}/cmdline").read_text().split("\0"):
            if arg.startswith("--node_id="):
                return arg.removeprefix("--node_id=")
    raise AssertionError(f"no raylet found for worker node {n}")
