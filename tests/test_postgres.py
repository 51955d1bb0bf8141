"""PostgreSQL behind MLflow and Optuna, on a real server (the ``postgres`` fixture of conftest.py):
an `mlflow server` on it tracking a study, two `ptmdd search` drivers at once on one Optuna study
in it, and unreachable or refusing databases named before anything runs."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import BIN, STUDY, free_port, is_loopback, listening, stop_server, stop_session, together, wait_http

# the shared tiny study, without its report settings and claims (these tests check the tracking)
STUDY = {**{k: v for k, v in STUDY.items() if k != "matrix"}, "name": "pgtiny", "control": None, "claims": []}


def _write(tmp_path, study, name="study.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(study))
    return path


def _cli(*args):
    return [sys.executable, "-m", "ptmdd_ray.cli", *map(str, args)]


def test_postgres_fixture_serves_fresh_databases_on_the_loopback_only(postgres):
    url = postgres.create_database()
    assert url.startswith(f"postgresql://ptmdd:{postgres.password}@127.0.0.1:{postgres.port}/t_")
    conn = postgres.connect(url.rsplit("/", 1)[1])
    with conn.cursor() as cur:
        cur.execute("select 1")
        assert cur.fetchone() == (1,)
    conn.close()
    servers = listening(postgres.session)
    assert servers and all(is_loopback(a) for a in servers), servers


# ---- bad input: one line, exit 2, before Ray starts, nothing written ----

def _refused(tmp_path, option, url, expect):
    path = _write(tmp_path, STUDY)
    start = time.monotonic()
    proc = subprocess.run(_cli("search", path, "--trials", 2, option, url, "--results", tmp_path / "results",
                               "--store", tmp_path / "store"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    took = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"ptmdd: error: {option[2:]}: ") and expect in lines[0], lines[0]
    assert "s3cret" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "store").exists()
    assert not list(tmp_path.glob("**/experiment_state*")) and not list(Path(tmp_path).glob("**/*.db"))
    assert took < 30, took  # python and imports; the connection itself fails in under a second here


@pytest.mark.parametrize("option", ["--optuna-storage", "--mlflow-uri"])
def test_unreachable_postgresql_is_one_line_before_anything_runs(tmp_path, option):
    port = free_port()  # nothing listens there
    _refused(tmp_path, option, f"postgresql://ptmdd:s3cret@127.0.0.1:{port}/optuna",
             f"cannot connect to PostgreSQL at 127.0.0.1:{port} (connection refused)")


@pytest.mark.parametrize("option", ["--optuna-storage", "--mlflow-uri"])
def test_postgresql_refusing_the_login_or_the_database_is_named_without_the_password(tmp_path, postgres, option):
    where = f"PostgreSQL at 127.0.0.1:{postgres.port}"
    _refused(tmp_path, option, postgres.url("postgres", password="s3cret"),
             f'cannot connect to {where} (password authentication failed for user "ptmdd")')
    url = postgres.url("no_such_db")
    path = _write(tmp_path, STUDY)
    proc = subprocess.run(_cli("search", path, "--trials", 2, option, url, "--results", tmp_path / "results",
                               "--store", tmp_path / "store"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert f'cannot connect to {where} (database "no_such_db" does not exist)' in proc.stderr
    assert postgres.password not in proc.stderr and not (tmp_path / "results").exists()


# ---- MLflow server on PostgreSQL ----

@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres, tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a fresh PostgreSQL database as its backend store and a
    temporary artifacts directory, in a process session of its own; stopped at the end."""
    root = tmp_path_factory.mktemp("mlflow-pg")
    port = free_port()
    # one web worker and no job runner (MLflow 3's GenAI jobs: seven more processes, and slow to stop)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "1", "--backend-store-uri", postgres.create_database(),
                                   "--artifacts-destination", str(root / "artifacts")],
                                  env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=180)
        yield f"http://127.0.0.1:{port}", server.pid
    finally:
        stop_server(server, wait=20)


def _drivers(cmds, cwd, timeout=900):
    """Run the commands at once, each in a process session of its own (its local Ray with it);
    whatever of a session is left when its driver is done, or on a failure, is stopped."""
    procs = [subprocess.Popen(c, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for c in cmds]
    try:
        return [(p, *p.communicate(timeout=timeout)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            stop_session(p.pid)


def _runs(url, name):
    import mlflow

    client = mlflow.MlflowClient(url)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return (client, [r for r in runs if r.data.tags.get("ptmdd.role") == "study"],
            [r for r in runs if r.data.tags.get("ptmdd.role") == "trial"])


@pytest.mark.slow
def test_study_tracked_by_an_mlflow_server_on_postgresql(tmp_path, postgres, mlflow_on_postgres):
    url, session = mlflow_on_postgres
    servers = {**listening(session), **listening(postgres.session)}
    assert all(is_loopback(a) for a in servers), servers
    path = _write(tmp_path, {**STUDY, "name": "pgstudy"})
    [(proc, out, err)] = _drivers([_cli("study", path, "--mlflow-uri", url, "--results", tmp_path / "results",
                                        "--store", tmp_path / "store")], tmp_path)
    assert proc.returncode == 0 and "2 trials, 0 failed" in out, err[-3000:]
    client, parents, children = _runs(url, "pgstudy")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["loss.clom"] for c in children) == ["0.0", "30.0"]
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert c.data.params["distill.ipc"] == "1" and 0.0 <= c.data.metrics["acc.mean"] <= 1.0
        assert "distill.seconds_per_iteration" in c.data.metrics
        assert len(client.get_metric_history(c.info.run_id, "distill.loss")) >= 1
        names = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"synthetic.parquet", "synthetic.png", "result.json", "pool.json"} <= names, names


PARENT = r'''
import sys
import mlflow
from ptmdd_ray import tracking
if sys.argv[1].startswith("http"):  # connected and warm (a database: the tables are made in the race)
    mlflow.MlflowClient(sys.argv[1]).search_experiments(max_results=1)
print("ready", flush=True)
sys.stdin.readline()  # go: all at once
print(tracking.start_parent(sys.argv[1], sys.argv[2], {"ptmdd.study": sys.argv[2]}))
'''


@pytest.mark.parametrize("where", [pytest.param("server", marks=pytest.mark.slow), "database"])
def test_drivers_opening_parent_runs_at_once_share_one_new_experiment(where, postgres, request):
    """Drivers starting together on a new study all find no experiment and create it: those that
    lose the race use the winner's (MLflow: RESOURCE_ALREADY_EXISTS). With a fresh database as the
    tracking URI they also race to create MLflow's tables; the losers retry and find them."""
    url = request.getfixturevalue("mlflow_on_postgres")[0] if where == "server" else postgres.create_database()
    results = together(PARENT, url, "racing", n=4)
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    _, parents, _ = _runs(url, "racing")
    assert sorted(p.info.run_id for p in parents) == sorted(out.strip() for _, out, _ in results)


# ---- two search drivers at once on one Optuna study ----

@pytest.mark.slow
def test_two_search_drivers_at_once_share_one_optuna_study_on_postgresql(tmp_path, postgres, mlflow_on_postgres):
    """Two `ptmdd search` drivers started together, each with its own local Ray, on one study
    name in one fresh PostgreSQL Optuna storage, one --results and one MLflow server: the study
    ends with exactly 2 + 3 COMPLETE trials (distinct numbers, distinct points: the drivers do not
    propose the same ones), each the one Tune trial and MLflow child run of its driver."""
    import optuna

    url, _ = mlflow_on_postgres
    storage = postgres.create_database()
    path = _write(tmp_path, {**STUDY, "name": "pgsearch", "max_concurrent": 1})
    counts = (2, 3)
    runs = _drivers([_cli("search", path, "--trials", n, "--optuna-storage", storage, "--mlflow-uri", url,
                          "--results", tmp_path / "results", "--store", tmp_path / "store") for n in counts], tmp_path)
    for n, (proc, out, err) in zip(counts, runs):
        assert proc.returncode == 0 and f"{n} trials, 0 failed" in out, err[-3000:]
        assert postgres.password not in out + err

    study = optuna.load_study(study_name="pgsearch", storage=storage)
    trials = study.trials
    assert len(trials) == 5 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4]
    points = {(t.params["loss.clom"], t.params["loss.cclom"]): t.value for t in trials}
    assert len(points) == 5  # no point proposed twice

    _, parents, children = _runs(url, "pgsearch")
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    per_parent = {p.info.run_id: [c for c in children if c.data.tags["mlflow.parentRunId"] == p.info.run_id]
                  for p in parents}
    assert sorted(len(c) for c in per_parent.values()) == [2, 3] and len(children) == 5
    assert all(c.info.status == "FINISHED" for c in children)
    logged = {(float(c.data.params["loss.clom"]), float(c.data.params["loss.cclom"])): c.data.metrics["val.acc.mean"]
              for c in children}
    assert logged.keys() == points.keys()  # each Optuna trial is one MLflow run, and the other way round
    assert all(logged[k] == pytest.approx(v) for k, v in points.items())
    experiments = sorted(p.name for p in (tmp_path / "results").glob("pgsearch-search-*"))
    assert len(experiments) == 2, experiments  # one Tune experiment per driver in the shared --results
