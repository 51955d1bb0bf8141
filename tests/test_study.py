"""`ptmdd study` end to end on a real local Ray, with a real MLflow SQLite store read back."""
import subprocess
import sys

import pytest
import yaml

from ptmdd_ray.config import ConfigError
from ptmdd_ray.study import load_study

STUDY = {
    "name": "tiny",
    "base": {"dataset": {"name": "digits", "im_size": 8}, "model": "ConvNetW32",
             "distill": {"method": "dm", "ipc": 1, "iterations": 10, "batch_real": 32},
             "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 2}, "pretrain": {"batch": 128},
             "eval": {"runs": 2, "epochs": 20}},
    "sweep": {"loss.clom": {"grid": [0.0, 30.0]}},
    "search": {"loss.clom": {"loguniform": [1.0, 100.0]}, "loss.cclom": {"uniform": [0.0, 1.0]}},
    "samples": 1,
    "max_concurrent": 2,
}


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
    with pytest.raises(ConfigError, match="search.nope"):
        load_study(_write(tmp_path, {**STUDY, "search": {"nope": {"uniform": [0.0, 1.0]}}}))


@pytest.mark.slow
def test_study_runs_trials_on_ray_and_records_them_in_mlflow(tmp_path):
    import mlflow

    from ptmdd_ray.store import CheckpointStore

    path = _write(tmp_path, STUDY)
    results = tmp_path / "results"

    def run(out):
        proc = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "study", str(path), "--results", str(out),
                               "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 trials, 0 failed" in proc.stdout

    run(results)
    assert (results / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()  # artifacts beside the db
    assert CheckpointStore(tmp_path / "store").stats()["trainings"] == 1  # one PTM, shared by the pool trial

    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("ptmdd.role") == "study"]
    children = [r for r in runs if r.data.tags.get("ptmdd.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert sorted(r.data.params["loss.clom"] for r in children) == ["0.0", "30.0"]
    for r in children:
        assert r.data.params["distill.method"] == "dm" and r.data.params["dataset.name"] == "digits"
        assert 0.0 <= r.data.metrics["acc.mean"] <= 1.0 and "baseline.random.mean" in r.data.metrics
        assert r.data.tags["ptmdd.swept"] == "loss.clom"
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"synthetic.parquet", "synthetic.png", "result.json", "pool.json"} <= names
    assert len(client.get_metric_history(children[0].info.run_id, "distill.loss")) >= 2

    # the report reads the runs back, tabulates each swept axis and logs itself to the parent run
    rep = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "report", "tiny", "--results", str(results),
                          "--out", str(tmp_path / "report")], capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## loss.clom" in md and "| 0.0 |" in md and "| 30.0 |" in md and "random real" in md
    png = (tmp_path / "report" / "acc_vs_loss.clom.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report/report.md", "report/acc_vs_loss.clom.png"} <= logged

    # a second run of the same study trains no PTM: all hits
    before = CheckpointStore(tmp_path / "store").stats()
    run(tmp_path / "results2")
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
