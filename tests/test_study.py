"""`ptmdd study` end to end on a real local Ray, with a real MLflow SQLite store read back."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ptmdd_ray.config import ConfigError
from helpers import STUDY, TINY_BASE, free_port, is_loopback, listening, session_pids, stop_session, wait_http
from ptmdd_ray.study_spec import load_study


def _write(tmp_path, study):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_study_grid_is_validated_before_anything_runs(tmp_path):
    study = load_study(_write(tmp_path, STUDY))
    assert study.grid == [{"loss.clom": 0.0}, {"loss.clom": 30.0}]
    assert study.trial_config({"loss.clom": 30.0}, sample=2).seed == 2
    with pytest.raises(ConfigError, match="sweep.distill.ipcc"):
        load_study(_write(tmp_path, {**STUDY, "sweep": {"distill.ipcc": {"grid": [1]}}}))
    with pytest.raises(ConfigError, match="distill.ipc"):
        load_study(_write(tmp_path, {**STUDY, "sweep": {"distill.ipc": {"grid": [1, 0]}}}))
    with pytest.raises(ConfigError, match="sweep.loss.clom"):
        load_study(_write(tmp_path, {**STUDY, "sweep": {"loss.clom": {"uniform": [0, 1]}}}))
    with pytest.raises(ConfigError, match="low 5.0 > high 1.0"):
        load_study(_write(tmp_path, {**STUDY, "search": {"loss.clom": {"uniform": [5.0, 1.0]}}}))
    with pytest.raises(ConfigError, match="search.loss.clom"):
        load_study(_write(tmp_path, {**STUDY, "search": {"loss.clom": {"uniform": [-1.0, 1.0]}}}))
    with pytest.raises(ConfigError, match="matrix: 'distill.ipc' is not a swept key"):
        load_study(_write(tmp_path, {**STUDY, "matrix": "distill.ipc"}))
    with pytest.raises(ConfigError, match=r"claims\[0\].better: \{'loss.clom': 5.0\} matches no grid point"):
        load_study(_write(tmp_path, {**STUDY, "claims": [{"claim": "x", "better": {"loss.clom": 5.0}}]}))
    with pytest.raises(ConfigError, match=r"claims\[0\].than: the study has no control"):
        load_study(_write(tmp_path, {**STUDY, "control": None, "claims": [{"claim": "x", "better": {"loss.clom": 30}}]}))
    with pytest.raises(ConfigError, match="control.loss.nope"):
        load_study(_write(tmp_path, {**STUDY, "control": {"loss.nope": 1}}))
    added = load_study(_write(tmp_path, {**STUDY, "control": {"loss.clom": 1.0}}))
    assert added.control_added and added.grid[-1] == {"loss.clom": 1.0} and len(added.grid) == 3
    assert not load_study(_write(tmp_path, STUDY)).control_added  # the control is already a grid point
    with pytest.raises(ConfigError, match="search.nope"):
        load_study(_write(tmp_path, {**STUDY, "search": {"nope": {"uniform": [0.0, 1.0]}}}))


def test_trial_paths_point_where_the_study_was_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = load_study(_write(tmp_path, {**STUDY, "base": {**STUDY["base"], "store": "ptms",
                                                           "dataset": {"name": "digits", "cache_dir": "cache", "val_per_class": 10}}}))
    monkeypatch.chdir("/")  # a trial worker runs in a directory of its own
    cfg = study.trial_config(study.grid[0], 0)
    assert cfg.dataset.cache_dir == str(tmp_path / "cache") and cfg.store == str(tmp_path / "ptms")
    sourced = load_study(_write(tmp_path, {**STUDY, "cases": [{"pool.source": {"name": "digits", "cache_dir": "c"}}]}))
    sourced.trial_config(sourced.grid[0], 0)
    assert sourced.grid[0]["pool.source"] == {"name": "digits", "cache_dir": "c"}  # the grid is not edited


@pytest.mark.slow
def test_study_runs_trials_on_ray_and_records_them_in_mlflow(tmp_path):
    import mlflow

    from ptmdd_ray.store import CheckpointStore

    path = _write(tmp_path, STUDY)
    results = tmp_path / "results"

    def run(out, *extra):
        proc = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "study", str(path), "--results", str(out),
                               "--store", "store", *extra], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 trials, 0 failed" in proc.stdout
        return proc.stdout

    stdout = run(results)
    # the closing summary: a table per point, the claims' verdicts, and where to look in MLflow
    assert re.search(r"^clom=30 +1 ", stdout, re.M) and "claim: CLoM helps:" in stdout, stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{results / 'mlflow.db'}" in stdout
    assert re.search(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?workflowType=machine_learning", stdout)
    assert (results / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()  # artifacts beside the db
    assert CheckpointStore(tmp_path / "store").stats()["trainings"] == 1  # one PTM, shared by the pool trial
    trial_dirs = list((results / "tiny").glob("trial_*"))  # each keeps its last checkpoint only, once over
    assert len(trial_dirs) == 2 and all(len(list(d.glob("checkpoint_*"))) == 1 for d in trial_dirs)

    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("ptmdd.role") == "study"]
    children = [r for r in runs if r.data.tags.get("ptmdd.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    # the MLflow UI: a model-training experiment, children named by grid point, a parent with a summary
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert sorted(r.info.run_name for r in children) == ["clom=0 #0", "clom=30 #0"]
    summary = parents[0].data.metrics
    assert summary["trials.finished"] == 2 and summary["trials.failed"] == 0
    assert {"best.val.acc.mean", "best.acc.mean", "control.acc.mean", "baseline.random.mean"} <= set(summary)
    assert parents[0].data.tags["ptmdd.kind"] == "study"
    assert {"study.yaml", "report", "rows.parquet"} <= {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert summary["best.n"] == 1 and parents[0].data.tags["ptmdd.samples"] == "1"
    for r in children:
        (inp,) = r.inputs.dataset_inputs
        assert inp.dataset.name == "digits" and '"val_per_class": 10' in inp.dataset.profile
        assert r.data.metrics["acc.mean"] and client.get_metric_history(r.info.run_id, "acc.mean")[0].timestamp > 0
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert sorted(r.data.params["loss.clom"] for r in children) == ["0.0", "30.0"]
    for r in children:
        assert r.data.params["distill.method"] == "dm" and r.data.params["dataset.name"] == "digits"
        # a relative --store means one store (and one store actor) for every trial, whatever its cwd
        assert r.data.params["store"] == str(tmp_path / "store")
        assert 0.0 <= r.data.metrics["acc.mean"] <= 1.0 and "baseline.random.mean" in r.data.metrics
        assert r.data.tags["ptmdd.swept"] == "loss.clom"
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"synthetic.parquet", "synthetic.png", "result.json", "pool.json"} <= names
    assert len(client.get_metric_history(children[0].info.run_id, "distill.loss")) >= 2
    # what each point cost, read back from MLflow: the CLoM trial trained the one PTM and carries
    # all of it (no other trial shares it); the plain one has no pool to pay for
    cost = {r.data.params["loss.clom"]: r.data.metrics for r in children}
    assert cost["30.0"]["cost.ptm_train.wall_s"] > 0 and cost["30.0"]["cost.store_bytes"] > 0
    assert cost["30.0"]["cost.pool_amortised.wall_s"] == cost["30.0"]["cost.pool.wall_s"] > 0
    assert cost["0.0"]["cost.pool.wall_s"] == cost["0.0"]["cost.ptm_train.wall_s"] == 0
    for m in cost.values():
        phases = sum(m[f"cost.{k}.wall_s"] for k in ("guide", "distill", "eval", "baseline"))
        assert m["cost.seconds"] == pytest.approx(phases + m["cost.pool_amortised.wall_s"])
        assert m["cost.distill.cpu_s"] > 0 and m["cost.peak_rss_mb"] > 0

    # the report reads the runs back, tabulates each swept axis and logs itself to the parent run
    rep = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "report", "tiny", "--results", str(results),
                          "--out", str(tmp_path / "report")], capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## loss.clom" in md and "| 0.0 |" in md and "| 30.0 |" in md and "random real" in md
    png = (tmp_path / "report" / "acc_vs_loss.clom.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Matrix: loss.clom" in md and (tmp_path / "report" / "matrix_loss.clom.png").exists()
    assert "## Findings" in md and "| CLoM helps | loss.clom=30.0 | the plain method |" in md
    assert re.search(r"^\| 0\.0 \|.*\| the plain method \|$", md, re.M), md  # its own row, not a self-test
    assert "inconclusive (fewer than 2 paired samples)" in md  # one sample: no verdict claimed
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report/report.md", "report/acc_vs_loss.clom.png", "report/matrix_loss.clom.png",
            "report/cost_pareto.png"} <= logged
    # the cost table: the CLoM point's pool, alone and amortised, as MLflow has it
    row = re.search(r"^\| \d \| loss\.clom=30\.0 \| 1 \|.*$", md, re.M).group(0).split(" | ")
    assert row[7] == row[8] == f"{cost['30.0']['cost.pool.wall_s']:.1f}", row
    assert re.search(r"^\| \d \| loss\.clom=0\.0 \| 1 \|.*\| the plain method \|$", md, re.M)

    # a second run of the same study trains no PTM: all hits
    before = CheckpointStore(tmp_path / "store").stats()
    quiet = run(tmp_path / "results2", "--quiet")
    assert quiet.startswith("study tiny: 2 trials") and "Trial status" not in quiet  # the closing table alone
    after = CheckpointStore(tmp_path / "store").stats()
    assert after["trainings"] == before["trainings"] and after["hits"] > before["hits"]


@pytest.mark.slow
def test_search_runs_optuna_trials_and_a_second_call_continues_the_study(tmp_path):
    import optuna

    path = _write(tmp_path, {**STUDY, "max_concurrent": 1})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "search", str(path), "--trials", "2",
                               "--optuna-storage", storage, "--results", str(tmp_path / "results"),
                               "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    assert all(1.0 <= t.params["loss.clom"] <= 100.0 and 0.0 <= t.params["loss.cclom"] <= 1.0 for t in done)
    assert all(0.0 <= t.value <= 1.0 for t in done)


@pytest.mark.slow
def test_a_two_objective_search_tells_optuna_both_values_and_reports_its_pareto_front(tmp_path):
    """``second_objective: cost.seconds``: a multi-objective Optuna study (its directions in the
    storage), each trial's two values exactly what its MLflow run holds, and a search report with
    Optuna's views, its Pareto front, and no importances yet (too few trials), logged to the parent."""
    import mlflow
    import optuna

    path = _write(tmp_path, {**STUDY, "second_objective": "cost.seconds"})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "search", str(path), "--trials", "2",
                           "--optuna-storage", storage, "--results", str(tmp_path / "results"),
                           "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    parents, children = _children(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    for t in done:  # the values Optuna was told are the trial's own, as MLflow recorded them
        (run,) = [r for r in children if float(r.data.params["loss.clom"]) == pytest.approx(t.params["loss.clom"])]
        assert t.values == [run.data.metrics["val.acc.mean"], run.data.metrics["cost.seconds"]]
    (parent,) = parents
    assert json.loads(parent.data.tags["ptmdd.objectives"]) == [["val.acc.mean", "max"], ["cost.seconds", "min"]]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/optuna_history.png", "report/optuna_pareto_front.png", "report/report.md"} <= logged
    md = Path(client.download_artifacts(parent.info.run_id, "report/report.md", str(tmp_path))).read_text()
    assert "### Pareto front" in md and "Not yet: importances need 20 completed trials" in md
    assert "cost.seconds (minimised)" in md


def _children(tracking_uri, name="tiny"):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return [], []
    runs = client.search_runs([exp.experiment_id])
    return ([r for r in runs if r.data.tags.get("ptmdd.role") == "study"],
            [r for r in runs if r.data.tags.get("ptmdd.role") == "trial"])


def _study_cmd(path, tmp_path, *extra):
    return [sys.executable, "-m", "ptmdd_ray.cli", "study", str(path), "--results", str(tmp_path / "results"),
            "--store", str(tmp_path / "store"), *extra]


def _wait_for(cond, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, "the study ended before the fault could be injected"
        assert time.monotonic() < deadline, "timed out waiting for the study"
        time.sleep(0.3)


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    """SIGKILL the driver (and the local Ray it started) after some trials finished and one has
    checkpointed mid-run; ``--resume`` completes the study: one FINISHED run per trial, finished ones
    not re-run, the cut-off one continued from its checkpoint, the killed attempt FAILED, the parent
    run continued and closed, the PTM trained once."""
    from ptmdd_ray.store import CheckpointStore

    study = {**STUDY, "sweep": {"loss.clom": {"grid": [0.0, 10.0, 30.0, 100.0]}}, "max_concurrent": 1}
    study["base"] = {**STUDY["base"], "distill": {**STUDY["base"]["distill"], "iterations": 60}}
    path = _write(tmp_path, study)
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    proc = subprocess.Popen(_study_cmd(path, tmp_path), cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def n_finished() -> int:
        return sum(r.info.status == "FINISHED" for r in _children(uri)[1])

    def checkpointed() -> int:  # trials with a checkpoint behind them, finished or not
        return len({f.parents[1] for f in (tmp_path / "results").glob("tiny/*/checkpoint_*/distill_state-*.safetensors")})

    try:  # two trials finished and one cut off mid-run, after a checkpoint
        _wait_for(lambda: (done := n_finished()) >= 2 and checkpointed() > done, proc)
    finally:
        _stop(proc)
    parents, before = _children(uri)
    finished_before = {r.info.run_id for r in before if r.info.status == "FINISHED"}
    assert 2 <= len(finished_before) < 4 and parents[0].info.status == "RUNNING"

    done = subprocess.run(_study_cmd(path, tmp_path, "--resume"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 trials, 0 failed, 0 pruned" in done.stdout  # a finished trial reported again is no pruned one
    parents, children = _children(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent, closed
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.data.params["loss.clom"] for r in finished) == ["0.0", "10.0", "100.0", "30.0"]
    assert len({r.data.tags["ptmdd.trial_key"] for r in finished}) == 4
    assert finished_before <= {r.info.run_id for r in finished}  # finished trials were not re-run
    assert all(r.info.status in ("FINISHED", "FAILED") for r in children)  # nothing left RUNNING
    for r in children:
        if r.info.status == "FAILED":
            assert "driver died" in r.data.tags["ptmdd.failure"]
    assert CheckpointStore(tmp_path / "store").stats()["trainings"] == 1
    # the trial cut off mid-run went on from its checkpoint, not from iteration 0
    assert any(r.data.metrics["distill.resumed_from"] > 0 for r in finished)


def _checkpoints(results: Path) -> list[int]:
    """The iterations of the distillation states a study's trials have checkpointed so far."""
    from ptmdd_ray.artifacts import read_tensors

    found = []
    for f in results.glob("*/*/checkpoint_*/distill_state-*.safetensors"):
        try:
            found.append(read_tensors(f)[1]["state"]["iteration"])
        except Exception:  # noqa: BLE001 - still being written
            pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("method, iterations", [("dm", 400), ("mtt", 1000)])
def test_trial_whose_worker_is_killed_resumes_from_its_checkpoint_and_is_recorded_once(tmp_path, method,
                                                                                        iterations):
    """SIGKILL the Ray worker running a trial after it checkpointed: Tune retries it, the second
    attempt goes on from the checkpoint (not iteration 0) and ends with exactly the synthetic set of
    an uninterrupted run; MLflow holds one FINISHED run for the trial and a FAILED one for the
    killed attempt. DM, and MTT (its learned step size and the expert draws resumed too)."""
    from ptmdd_ray.artifacts import read_synthetic

    study = {**STUDY, "sweep": {"loss.clom": {"grid": [30.0]}}, "max_failures": 1, "control": None, "claims": []}
    base = MTT_BASE if method == "mtt" else STUDY["base"]
    study["base"] = {**base, "distill": {**base["distill"], "iterations": iterations, "checkpoint_every": 50}}
    path = _write(tmp_path, study)
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    proc = subprocess.Popen(_study_cmd(path, tmp_path), cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _checkpoints(tmp_path / "results") and session_pids(proc.pid, "ray::ImplicitFunc"), proc)
        saved = max(_checkpoints(tmp_path / "results"))
        for pid in session_pids(proc.pid, "ray::ImplicitFunc"):
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "1 trials, 0 failed" in out
    parents, children = _children(uri)
    assert parents[0].info.status == "FINISHED"
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    assert len({r.data.tags["ptmdd.trial_key"] for r in children}) == 1
    failed = next(r for r in children if r.info.status == "FAILED")
    assert "worker died" in failed.data.tags["ptmdd.failure"]
    finished = next(r for r in children if r.info.status == "FINISHED")
    assert 50 <= saved <= finished.data.metrics["distill.resumed_from"] < iterations

    clean = subprocess.run([*_study_cmd(path, tmp_path), "--results", str(tmp_path / "clean")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    resumed_set, = (tmp_path / "results").glob("tiny/*/out/synthetic.parquet")
    clean_set, = (tmp_path / "clean").glob("tiny/*/out/synthetic.parquet")
    assert (read_synthetic(resumed_set)[0] == read_synthetic(clean_set)[0]).all()  # bit for bit
    learned = [json.loads((p.parent / "result.json").read_text()).get("learned_lr") for p in (resumed_set, clean_set)]
    assert learned[0] == learned[1] and (learned[0] is not None) == (method == "mtt")


def _used_bytes() -> tuple[int, int]:
    """The node's used memory as Ray's memory monitor counts it (total less available), and its total."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total, available = (int(info[k].split()[0]) * 1024 for k in ("MemTotal", "MemAvailable"))
    return total - available, total


@pytest.mark.slow
def test_a_study_survives_rays_memory_monitor_killing_its_trial_worker(tmp_path):
    """The node runs short of memory mid-trial (another process fills it) and Ray's memory monitor
    kills the trial's worker. Tune raises on that (not a retried actor error); the driver restores the
    study from its own saved state, and the trial goes on from its checkpoint: the study ends with
    exit 0 and one FINISHED run, as after a SIGKILLed worker."""
    used, total = _used_bytes()
    if total - used < 10 * 2**30:
        pytest.skip(f"needs 10 GiB of free memory to fill, has {(total - used) / 2**30:.1f}")
    # the monitor's line: 5 GiB above what is used now, room for the study's own processes
    threshold = (used + 5 * 2**30) / total
    study = {**STUDY, "sweep": {"loss.clom": {"grid": [30.0]}}, "max_failures": 1, "control": None, "claims": []}
    study["base"] = {**STUDY["base"], "distill": {**STUDY["base"]["distill"], "iterations": 2000,
                                                  "checkpoint_every": 50}}
    path = _write(tmp_path, study)
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    env = {**os.environ, "RAY_memory_usage_threshold": f"{threshold:.4f}", "RAY_memory_monitor_refresh_ms": "100"}
    proc = subprocess.Popen(_study_cmd(path, tmp_path), cwd=tmp_path, start_new_session=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    filler = Path("/dev/shm") / f"ptmdd-test-filler-{os.getpid()}"  # tmpfs pages count as used memory
    try:
        _wait_for(lambda: _checkpoints(tmp_path / "results") and session_pids(proc.pid, "ray::ImplicitFunc"), proc)
        worker, = session_pids(proc.pid, "ray::ImplicitFunc")
        with open(filler, "wb") as f:  # allocated at once, past the line by 2 GiB
            os.posix_fallocate(f.fileno(), 0, int(threshold * total) - _used_bytes()[0] + 2 * 2**30)
        _wait_for(lambda: worker not in session_pids(proc.pid, "ray::ImplicitFunc"), proc, timeout=60)
        filler.unlink()  # the monitor kills until the node is under its line again: let the restored trial run
        out, err = proc.communicate(timeout=600)
    finally:
        filler.unlink(missing_ok=True)
        _stop(proc)
    assert "killed due to the node running low on memory" in err, err[-3000:]
    assert proc.returncode == 0, err[-3000:]
    assert "restoring the study" in err and "1 trials, 0 failed" in out
    parents, children = _children(uri)
    assert parents[0].info.status == "FINISHED"
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == 1 and len({r.data.tags["ptmdd.trial_key"] for r in children}) == 1
    assert 50 <= finished[0].data.metrics["distill.resumed_from"] < 2000  # from its checkpoint, not from 0


@pytest.mark.slow
def test_study_survives_its_store_actor_being_killed(tmp_path):
    """SIGKILL the checkpoint-store actor mid-study: Ray restarts it, it recovers its index from
    storage (the PTM is not trained again) and the study completes."""
    from ptmdd_ray.store import CheckpointStore

    study = {**STUDY, "sweep": {"loss.clom": {"grid": [10.0, 30.0, 100.0]}}, "max_concurrent": 1, "control": None,
             "claims": []}
    path = _write(tmp_path, study)
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    proc = subprocess.Popen(_study_cmd(path, tmp_path), cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: any(r.info.status == "FINISHED" for r in _children(uri)[1]), proc)
        servers = listening(proc.pid)  # the study's local Ray: every server on the loopback only
        assert "gcs_server" in servers.values() and "raylet" in servers.values(), servers
        assert all(is_loopback(a) for a in servers), {a: n for a, n in servers.items() if not is_loopback(a)}
        actors = session_pids(proc.pid, "ray::StoreActor")
        assert actors, "no store actor process found"
        for pid in actors:
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "3 trials, 0 failed" in out
    _, children = _children(uri)
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 3
    stats = CheckpointStore(tmp_path / "store").stats()
    assert stats["trainings"] == 1 and stats["hits"] >= 2


@pytest.mark.slow
def test_search_prunes_trailing_trials_on_intermediate_evaluations(tmp_path):
    """``--prune``: ASHA stops trials that trail at the same intermediate evaluation; Optuna records
    them PRUNED (not COMPLETE with a partial score) and their MLflow runs end KILLED, tagged."""
    import mlflow
    import optuna

    study = {**STUDY, "max_concurrent": 1, "matrix": None,
             "search": {"distill.init": {"choice": ["real", "noise"]}, "distill.lr_img": {"loguniform": [0.1, 10.0]}}}
    study["base"] = {**STUDY["base"], "distill": {**STUDY["base"]["distill"], "iterations": 30},
                     "eval": {"runs": 1, "epochs": 100, "every": 10}, "loss": {"clom": 0.0}}
    path = _write(tmp_path, study)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "search", str(path), "--trials", "6", "--prune",
                           "--optuna-storage", storage, "--results", str(tmp_path / "results"),
                           "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    states = [t.state for t in trials]
    pruned = states.count(optuna.trial.TrialState.PRUNED)
    assert states.count(optuna.trial.TrialState.COMPLETE) + pruned == 6 and pruned >= 1
    assert f"6 trials, 0 failed, {pruned} pruned" in proc.stdout
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    _, children = _children(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    killed = [r for r in children if r.info.status == "KILLED"]
    assert len(killed) == pruned and all("pruned" in r.data.tags["ptmdd.stopped"] for r in killed)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == 6 - pruned
    assert all(len(client.get_metric_history(r.info.run_id, "val.acc.intermediate")) == 2 for r in finished)
    # progress between the scores: Tune heard the iteration and loss every 10 iterations
    import json as _json
    reports = [[_json.loads(line) for line in p.read_text().splitlines()]
               for p in (tmp_path / "results").glob("*/trial_*/result.json")]
    done = [rs for rs in reports if rs[-1].get("trial.final")]
    assert len(reports) == 6 and len(done) == 6 - pruned
    assert all(any("distill.loss" in r and "val.acc.mean" not in r for r in rs) for rs in done)


@pytest.mark.slow
def test_a_diverging_trial_fails_with_its_reason_and_the_study_goes_on(tmp_path):
    study = {**STUDY, "sweep": {"distill.lr_img": {"grid": [1.0, 1e30]}}, "matrix": None, "max_failures": 2,
             "control": None, "claims": []}
    study["base"] = {**STUDY["base"], "loss": {"clom": 0.0}}
    path = _write(tmp_path, study)
    proc = subprocess.run(_study_cmd(path, tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "2 trials, 1 failed" in proc.stdout, proc.stderr[-3000:]
    parents, children = _children(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    assert parents[0].info.status == "FAILED"
    assert [r.data.params["distill.lr_img"] for r in children if r.info.status == "FINISHED"] == ["1.0"]
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(failed) == 1  # the retries saw the deterministic failure and did not run it again
    assert failed[0].data.tags["ptmdd.failure"].startswith("DivergenceError: distillation diverged")


def test_only_bad_input_and_divergence_fail_a_trial_for_good():
    """What a trial's run records as deterministic (a resumed study does not run it again): not a
    killed worker, not memory that was short only while a neighbouring trial peaked."""
    from ptmdd_ray.errors import ConfigError, DivergenceError, MemoryShortError
    from ptmdd_ray.study.trial import fails_for_good

    assert fails_for_good(ConfigError("distill.ipc: must be >= 1, got 0"))
    assert fails_for_good(DivergenceError("distillation diverged at iteration 3"))
    assert not fails_for_good(MemoryShortError("distill.syn_steps: need ~3.1 GiB, more than the 2.9 GiB free"))
    assert not fails_for_good(RuntimeError("the worker died"))


def _failing(times: int, error: Exception):
    """A run that raises ``error`` on its first ``times`` calls, then returns; and its list of calls."""
    calls = []

    def run():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "distilled"

    return run, calls


def test_a_trial_waits_out_memory_that_is_short_for_the_moment_and_no_longer():
    from ptmdd_ray.errors import ConfigError, MemoryShortError
    from ptmdd_ray.study.trial import waiting_for_memory

    short = MemoryShortError("distill.syn_steps: need ~3.1 GiB, more than the 2.9 GiB free on cpu now")
    run, calls = _failing(2, short)
    assert waiting_for_memory(run, patience_s=5.0, poll_s=0.01) == "distilled" and len(calls) == 3

    run, calls = _failing(10**9, short)
    with pytest.raises(MemoryShortError):
        waiting_for_memory(run, patience_s=0.2, poll_s=0.05)
    assert 2 <= len(calls) <= 5  # tried again until its patience ran out, then gave up

    run, calls = _failing(1, ConfigError("distill.syn_steps: must be >= 1, got 0"))
    with pytest.raises(ConfigError):
        waiting_for_memory(run, patience_s=5.0, poll_s=0.01)
    assert len(calls) == 1  # not a matter of waiting


def test_unreachable_mlflow_server_is_a_clear_error_before_anything_runs(tmp_path):
    path = _write(tmp_path, STUDY)
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run(_study_cmd(path, tmp_path, "--mlflow-uri", url), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"mlflow-uri: cannot reach the MLflow server at {url}" in lines[0]
    assert not (tmp_path / "results").exists() and not (tmp_path / "store").exists()


def _mlflow_server(tmp_path, port):
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server-artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc


def _stop(proc):
    """Crash ``proc`` (SIGKILL its process group), then stop what is left of its session: Ray gives
    each worker a process group of its own, so the driver's group alone would leave them running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stop_session(proc.pid)


@pytest.mark.slow
def test_mlflow_going_away_mid_study_loses_no_result(tmp_path):
    """The MLflow server dies after the first trial: the study completes, the other trials keep
    their results (Tune, result.json), and `ptmdd report --sync` logs them once it is back: one
    FINISHED run per trial, the parent closed."""
    study = {**STUDY, "sweep": {"loss.clom": {"grid": [0.0, 10.0, 30.0]}}, "max_concurrent": 1}
    study["base"] = {**STUDY["base"], "distill": {**STUDY["base"]["distill"], "iterations": 60}}
    path = _write(tmp_path, study)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _mlflow_server(tmp_path, port)
    try:
        proc = subprocess.Popen(_study_cmd(path, tmp_path, "--mlflow-uri", url), cwd=tmp_path,
                                start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(lambda: any(r.info.status == "FINISHED" for r in _children(url)[1]), proc)
            _stop(server)
            out, err = proc.communicate(timeout=600)
        finally:
            _stop(proc)
        assert proc.returncode == 0 and "3 trials, 0 failed" in out, err[-3000:]
        assert "report" in err and "--sync" in err  # the driver says how to log what is pending
        pending = list((tmp_path / "results").glob("tiny/*/out/mlflow_pending.json"))
        assert 1 <= len(pending) <= 2
        # one slot: the three trials ran in one worker process, one after the other, and each left
        # its outputs in its own directory of the experiment (a reused worker's too)
        reports = [json.loads(line) for f in (tmp_path / "results").glob("tiny/*/result.json")
                   for line in f.read_text().splitlines()]
        assert len({r["trial_id"] for r in reports}) == 3 and len({r["pid"] for r in reports}) == 1
        assert len(list((tmp_path / "results").glob("tiny/*/out/result.json"))) == 3
        server = _mlflow_server(tmp_path, port)
        rep = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "report", "tiny", "--sync", "--mlflow-uri", url,
                              "--results", str(tmp_path / "results"), "--out", str(tmp_path / "report")],
                             capture_output=True, text=True, timeout=300)
        assert rep.returncode == 0, rep.stderr[-2000:]
        assert f"synced {len(pending)} trial run(s)" in rep.stdout
        parents, children = _children(url)
        finished = [r for r in children if r.info.status == "FINISHED"]
        assert sorted(r.data.params["loss.clom"] for r in finished) == ["0.0", "10.0", "30.0"]
        assert len({r.data.tags["ptmdd.trial_key"] for r in finished}) == 3
        assert all("acc.mean" in r.data.metrics for r in finished)
        assert parents[0].info.status == "FINISHED"
        assert not list((tmp_path / "results").glob("tiny/*/out/mlflow_pending.json"))
    finally:
        _stop(server)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_studies_at_once_share_a_store_without_training_twice(tmp_path, where, request):
    """Two drivers, each with its own local Ray (two Ray clusters, so two store actors), on one
    store: the store's lock (a flock locally, a lease object on S3) makes each PTM run train once;
    both studies complete and the counters add up."""
    from ptmdd_ray.store import CheckpointStore

    store, env = (str(tmp_path / "store"), None) if where == "local" else _s3_store(request)
    study = {**STUDY, "base": {**STUDY["base"], "pool": {"archs": ["ConvNetW32"], "seeds": 2, "epoch": 2}}}
    path = _write(tmp_path, study)
    procs = [subprocess.Popen([sys.executable, "-m", "ptmdd_ray.cli", "study", str(path), "--results",
                               str(tmp_path / f"results{i}"), "--store", store], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            _stop(p)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "2 trials, 0 failed" in out, err[-3000:]
    stats = CheckpointStore(store).stats()
    assert stats["trainings"] == 2 and stats["checkpoints"] == 2  # two seeds, each trained once
    assert stats["hits"] == 2 * 2 - 2  # two pool trials x two PTMs, less the two trainings


def _s3_store(request) -> tuple[str, dict]:
    s3 = request.getfixturevalue("s3")
    return s3.uri, s3.env


@pytest.mark.slow
def test_a_killed_trainer_on_s3_is_taken_over_when_its_lease_expires(tmp_path, s3):
    """Two drivers on two local Ray clusters need the same PTM from one S3 store; the one whose
    trial holds the training lease is SIGKILLed mid-training (driver, Ray, trial worker). Its
    lease stops being renewed and expires; the other driver's trial takes it over, trains, and
    the store ends with one finished set of checkpoints and one training."""
    import json

    from ptmdd_ray.store import CheckpointStore

    study = {**STUDY, "sweep": {"loss.clom": {"grid": [30.0]}}, "control": None, "claims": [], "matrix": None,
             "base": {**STUDY["base"], "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 40},
                      "pretrain": {"batch": 16, "epochs": 40, "save_epochs": []}}}
    path = _write(tmp_path, study)
    procs = [subprocess.Popen([sys.executable, "-m", "ptmdd_ray.cli", "study", str(path), "--results",
                               str(tmp_path / f"results{i}"), "--store", s3.uri], cwd=tmp_path, env=s3.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for i in range(2)]
    try:
        lease = None
        deadline = time.monotonic() + 300
        while lease is None:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no training lease seen"
            held = [n for n in s3.names("locks/") if n.startswith("locks/train-")]
            lease = json.loads(s3.get(held[0])) if held else None
            time.sleep(0.2)
        holder = next(p for p in procs if lease["pid"] in session_pids(p.pid))
        other = next(p for p in procs if p is not holder)
        assert not CheckpointStore(s3.uri).keys()  # mid-training: nothing committed yet
        _stop(holder)
        out, err = other.communicate(timeout=900)
    finally:
        for p in procs:
            _stop(p)
    assert other.returncode == 0 and "1 trials, 0 failed" in out, err[-3000:]
    stats = CheckpointStore(s3.uri).stats()
    assert stats["checkpoints"] == 1 and stats["trainings"] == 1
    assert not s3.names("locks/")  # the survivor released the lease it took over


def test_choices_are_made_on_validation_unless_the_user_says_otherwise(tmp_path):
    """A search or a scheduler chooses by the study's metric: a test metric is refused unless
    --select-on-test, which tags the parent run (and the report then warns)."""
    from ptmdd_ray import tracking
    from ptmdd_ray.report import selection_lines
    from ptmdd_ray.rows import StudyRun
    from ptmdd_ray.study import open_parent
    from ptmdd_ray.study_spec import check_selection

    on_test = load_study(_write(tmp_path, {**STUDY, "metric": "acc.mean"}))
    with pytest.raises(ConfigError, match="metric: acc.mean is test accuracy"):
        check_selection(on_test, search=True, prune=False, select_on_test=False)
    check_selection(on_test, search=True, prune=False, select_on_test=True)
    check_selection(on_test, search=False, prune=False, select_on_test=False)  # a grid only reports
    pruned = {**STUDY, "base": {**TINY_BASE, "eval": {"runs": 1, "epochs": 5, "every": 5}}}
    check_selection(load_study(_write(tmp_path, pruned)), search=True, prune=True, select_on_test=False)
    with pytest.raises(ConfigError, match="prune: the intermediate evaluations are on the val split"):
        check_selection(load_study(_write(tmp_path, {**pruned, "metric": "acc.mean"})), True, True, True)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for flag, warned in ((True, True), (False, False)):
        run_id = open_parent(tracking, uri, on_test, ["loss.clom"], str(tmp_path / f"exp{flag}"), False, None, flag)
        import mlflow
        parent = mlflow.MlflowClient(uri).get_run(run_id)
        assert (parent.data.tags.get("ptmdd.select_on_test") == "true") is flag
        assert parent.data.tags["ptmdd.metric"] == "acc.mean"
        assert ("Selected on test accuracy" in "".join(selection_lines(StudyRun(run_id, parent.data.tags)))) is warned


def test_the_best_point_is_best_on_its_mean_over_samples_not_its_luckiest_trial():
    """Point A has the single best trial (0.9) but the worse mean (0.5); B is best on the mean."""
    from ptmdd_ray.study import summary_metrics
    from ptmdd_ray.study_spec import StudyConfig

    def row(clom, val, test):
        return {"overrides": {"loss.clom": clom}, "error": False,
                "metrics": {"val.acc.mean": val, "acc.mean": test, "trial.final": 1.0}}

    rows = [row(1.0, 0.9, 0.80), row(1.0, 0.1, 0.20), row(2.0, 0.6, 0.55), row(2.0, 0.6, 0.65)]
    out = summary_metrics(StudyConfig(metric="val.acc.mean"), rows)
    assert out["best.val.acc.mean"] == pytest.approx(0.6) and out["best.acc.mean"] == pytest.approx(0.6)
    assert out["best.n"] == 2 and out["trials.finished"] == 4
    assert summary_metrics(StudyConfig(metric="val.acc.mean", mode="min"), rows)["best.val.acc.mean"] == \
        pytest.approx(0.5)


def test_a_study_without_a_metric_chooses_on_validation_or_says_it_is_on_test(tmp_path):
    with_val = {k: v for k, v in STUDY.items() if k != "metric"}
    assert load_study(_write(tmp_path, with_val)).spec.metric == "val.acc.mean"
    base = {**STUDY["base"], "dataset": {**STUDY["base"]["dataset"], "val_per_class": 0}}
    assert load_study(_write(tmp_path, {**with_val, "base": base})).spec.metric == "acc.mean"


MTT_BASE = {**TINY_BASE, "distill": {"method": "mtt", "ipc": 1, "iterations": 6, "syn_steps": 3, "max_start_epoch": 2,
                                     "expert_epochs": 1, "lr_img": 1.0, "lr_lr": 1e-7, "checkpoint_every": 2},
            "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 1},
            "pretrain": {"epochs": 3, "batch": 128, "momentum": 0.0, "weight_decay": 0.0, "schedule": "constant"}}


@pytest.mark.slow
def test_an_mtt_study_and_search_run_on_ray_share_one_expert_and_record_the_learned_step(tmp_path):
    """Issue 26: MTT through the study's machinery as the other methods: Tune trials (checkpointing
    along the way), one expert trained once for both trials (the store actor's single flight),
    MLflow records with the learned step size, the report with its claim, and an Optuna search."""
    import optuna

    from ptmdd_ray.store import CheckpointStore

    study = {**STUDY, "name": "mtt", "base": MTT_BASE, "sweep": {"loss.clom": {"grid": [0.0, 0.5]}},
             "search": {"loss.clom": {"uniform": [0.0, 1.0]}}, "control": {"loss.clom": 0.0},
             "claims": [{"claim": "CLoM helps MTT", "better": {"loss.clom": 0.5}, "than": "control"}]}
    path = _write(tmp_path, study)
    proc = subprocess.run(_study_cmd(path, tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trials, 0 failed" in proc.stdout and "claim: CLoM helps MTT:" in proc.stdout
    assert CheckpointStore(tmp_path / "store").stats()["trainings"] == 1  # one expert run for both trials
    parents, children = _children(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}", "mtt")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    for r in children:
        assert r.data.params["distill.method"] == "mtt" and r.data.params["distill.syn_steps"] == "3"
        assert r.data.metrics["distill.learned_lr"] > 0 and 0 <= r.data.metrics["val.acc.mean"] <= 1
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "search", str(path), "--trials", "1",
                             "--optuna-storage", storage, "--results", str(tmp_path / "search"),
                             "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert search.returncode == 0, search.stderr[-3000:]
    done = optuna.load_study(study_name="mtt", storage=storage).trials
    assert len(done) == 1 and 0.0 <= done[0].value <= 1.0
