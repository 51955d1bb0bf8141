"""Tracking on a real MLflow SQLite store: parent/child runs, exactly-once claims, resume."""
import pytest

from ptmdd_ray import tracking
from ptmdd_ray.config import build_config


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _trial(uri, parent, key):
    cfg = build_config({"dataset": {"name": "digits"}})
    return tracking.log_trial(uri, parent, cfg, {"ptmdd.trial_id": "t", "ptmdd.trial_key": key})


def test_claim_reuses_a_finished_run_and_fails_dead_attempts(uri):
    parent = tracking.start_parent(uri, "exp", {"ptmdd.study": "exp"})
    assert tracking.claim_trial(uri, parent, "k1") == (None, None)  # never run
    client, dead = _trial(uri, parent, "k1")  # an attempt whose worker died: left RUNNING
    assert tracking.claim_trial(uri, parent, "k1") == (None, None)
    assert client.get_run(dead).info.status == "FAILED"
    assert "worker died" in client.get_run(dead).data.tags["ptmdd.failure"]
    _, ok = _trial(uri, parent, "k1")
    client.log_metric(ok, "acc.mean", 0.75)
    client.set_terminated(ok, "FINISHED")
    assert tracking.claim_trial(uri, parent, "k1") == ({"acc.mean": 0.75}, None)
    assert tracking.claim_trial(uri, parent, "k2") == (None, None)  # another trial is not confused with it
    _, diverged = _trial(uri, parent, "k2")
    tracking.fail_stale(client, diverged, "DivergenceError: diverged at iteration 3", deterministic=True)
    assert tracking.claim_trial(uri, parent, "k2") == (None, "DivergenceError: diverged at iteration 3")
    assert client.get_run(ok).data.params["dataset.name"] == "digits"


def test_reopen_continues_the_parent_and_close_leaves_nothing_running(uri):
    import mlflow

    parent = tracking.start_parent(uri, "exp", {"ptmdd.study": "exp"})
    client, orphan = _trial(uri, parent, "k")  # the driver died with this trial RUNNING
    assert tracking.reopen_parent(uri, parent)
    assert client.get_run(orphan).info.status == "FAILED"
    assert "driver died" in client.get_run(orphan).data.tags["ptmdd.failure"]
    _, stopped = _trial(uri, parent, "k2")
    tracking.close_parent(uri, parent, "FINISHED")
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(stopped).info.status == "FAILED"
    assert not tracking.reopen_parent(uri, "0" * 32)  # unknown run: the caller starts a new parent
    mlflow.MlflowClient(uri).delete_run(parent)
    assert not tracking.reopen_parent(uri, parent)


def test_metrics_of_flattens_a_result():
    result = {"accuracy": {"A": {"mean": 0.6, "std": 0.1, "runs": [0.5, 0.7]}, "B": {"mean": 0.8, "std": 0.0}},
              "baseline_random": {"A": {"mean": 0.5, "std": 0.0}},
              "timing": {"seconds_per_iteration": 0.1, "distill_seconds": 1.0, "eval_seconds": 2.0}}
    m = tracking.metrics_of(result)
    assert m["acc.mean"] == pytest.approx(0.7) and m["acc.A.std"] == 0.1
    assert (m["acc.A.run0"], m["acc.A.run1"]) == (0.5, 0.7) and "acc.B.run0" not in m  # each evaluation model
    assert m["baseline.random.mean"] == 0.5 and m["distill.seconds_per_iteration"] == 0.1
    assert m["baseline.random.cached"] == 0.0  # evaluated by this run
    cached = tracking.metrics_of({**result, "timing": {**result["timing"], "baseline_cached": True}})
    assert cached["baseline.random.cached"] == 1.0
    assert "baseline.random.cached" not in tracking.metrics_of({**result, "baseline_random": None})


def test_a_stopped_trial_left_running_is_closed_killed_by_the_driver(uri, monkeypatch):
    """A trial pruned by the scheduler whose worker was ended before it closed its run: the
    driver's searcher closes it KILLED with the reason; other trials' runs are left alone."""
    parent = tracking.start_parent(uri, "exp", {"ptmdd.study": "exp"})
    client, stopped = _trial(uri, parent, "k1")
    _, other = _trial(uri, parent, "k2")
    tracking.end_stopped(uri, parent, "k1", "pruned by the scheduler")
    run = client.get_run(stopped)
    assert run.info.status == "KILLED" and run.data.tags["ptmdd.stopped"] == "pruned by the scheduler"
    assert client.get_run(other).info.status == "RUNNING"
    tracking.end_stopped(uri, parent, "k1", "again")  # already closed (by its worker or before): untouched
    assert client.get_run(stopped).data.tags["ptmdd.stopped"] == "pruned by the scheduler"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracking.end_stopped("http://127.0.0.1:9", parent, "k2", "x")  # MLflow away: a warning, no exception
