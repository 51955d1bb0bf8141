"""Per-trial rows: read back from a real MLflow store, written to Parquet and read back, and a
report made from the file equal to the one made from MLflow."""
import json

import pytest

from ptmdd_ray.config import ConfigError
from ptmdd_ray.rows import StudyRun, from_mlflow, read_rows, write_rows


def _study_in_mlflow(uri: str) -> str:
    """A finished two-point study with claims, logged as `ptmdd study` logs one: a parent run with
    the ptmdd.* tags and a child per trial (point, sample, params, metrics); one child FAILED."""
    import mlflow

    from ptmdd_ray import tracking

    claims = [{"claim": "CLoM helps", "better": {"loss.clom": 30.0}, "than": "control"},
              {"claim": "beats random", "better": {"loss.clom": 30.0}, "than": "random"}]
    parent = tracking.start_parent(uri, "tiny", {
        "ptmdd.study": "tiny", "ptmdd.kind": "study", "ptmdd.swept": "loss.clom", "ptmdd.matrix": "",
        "ptmdd.control": json.dumps({"loss.clom": 0.0}), "ptmdd.control_added": "false", "ptmdd.cases": "[]",
        "ptmdd.claims": json.dumps(claims), "ptmdd.metric": "val.acc.mean", "ptmdd.samples": "3", "ptmdd.role": "study"})
    client = mlflow.MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    for clom, base_acc in ((0.0, 0.40), (30.0, 0.46)):
        for s in range(3):
            child = client.create_run(exp, tags={"mlflow.parentRunId": parent, "ptmdd.point": json.dumps({"loss.clom": clom}),
                                                 "ptmdd.sample": str(s), "ptmdd.git_commit": "abc123", "ptmdd.role": "trial"})
            rid = child.info.run_id
            for k, v in {"seed": str(s), "loss.clom": str(clom), "distill.method": "dm", "eval.runs": "2",
                         "eval.epochs": "300"}.items():
                client.log_param(rid, k, v)
            acc = base_acc + 0.01 * s + (0.002 if clom else 0.0) * s
            for k, v in {"acc.mean": acc, "acc.ConvNetW32.run0": acc - 0.01, "acc.ConvNetW32.run1": acc + 0.01,
                         "val.acc.mean": acc - 0.02, "baseline.random.mean": 0.30 + 0.01 * s, "eval.seconds": 5.0}.items():
                client.log_metric(rid, k, v)
            client.set_terminated(rid, "FINISHED")
    failed = client.create_run(exp, tags={"mlflow.parentRunId": parent, "ptmdd.point": json.dumps({"loss.clom": 30.0}),
                                          "ptmdd.sample": "9"})
    client.set_terminated(failed.info.run_id, "FAILED")
    return parent


def test_rows_round_trip_through_parquet_with_the_parent_tags(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = _study_in_mlflow(uri)
    run = from_mlflow(uri, "tiny")
    assert run.run_id == parent and len(run.rows) == 6 and run.swept == ["loss.clom"]  # the FAILED trial left out
    path = write_rows(run, tmp_path / "rows" / "tiny.parquet")
    assert [p.name for p in path.parent.iterdir()] == ["tiny.parquet"]  # no temporary file left behind
    back = read_rows(path)
    assert back.run_id == parent and back.tags == run.tags and back.study == "tiny"
    key = lambda r: (json.dumps(r["point"], sort_keys=True), r["sample"])  # noqa: E731
    for a, b in zip(sorted(run.rows, key=key), sorted(back.rows, key=key)):
        assert (a["point"], a["sample"], a["params"], a["values"], a["commit"]) == \
            (b["point"], b["sample"], b["params"], b["values"], b["commit"])
        assert a["metrics"] == pytest.approx(b["metrics"])
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert {"seed", "commit", "acc.ConvNetW32.run0", "val.acc.mean", "baseline.random.mean"} <= set(table.column_names)
    assert table.column("seed").to_pylist() == [0, 1, 2, 0, 1, 2]


def test_a_report_from_the_rows_file_equals_the_report_from_mlflow(tmp_path):
    from ptmdd_ray.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _study_in_mlflow(uri)
    rows = tmp_path / "tiny.parquet"
    assert main(["rows", "tiny", "--mlflow-uri", uri, "--out", str(rows)]) == 0
    assert main(["report", "tiny", "--mlflow-uri", uri, "--out", str(tmp_path / "a")]) == 0
    assert main(["report", "--from", str(rows), "--out", str(tmp_path / "b")]) == 0
    a = (tmp_path / "a" / "report.md").read_text().splitlines()
    b = (tmp_path / "b" / "report.md").read_text().splitlines()
    assert "rows file `tiny.parquet`" in b[2] and "commit `abc123`" in b[2]
    assert a[3:] == b[3:]  # everything after the line naming the source
    assert any("| CLoM helps |" in ln and "**holds**" in ln for ln in b)


def test_a_file_that_is_not_a_rows_file_is_one_line(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ptmdd_ray.cli import main

    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match=r"^from: .*x.parquet: not a rows file"):
        read_rows(tmp_path / "x.parquet")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(ConfigError, match=r"not a rows file \(written by `ptmdd rows`\); missing study"):
        read_rows(tmp_path / "plain.parquet")
    assert main(["report", "--from", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.parquet" in err[0] and not (tmp_path / "r").exists()


def test_an_empty_study_run_writes_a_file_that_reads_back_empty(tmp_path):
    path = write_rows(StudyRun("r", {"ptmdd.study": "s"}), tmp_path / "e.parquet")
    assert read_rows(path).rows == [] and read_rows(path).study == "s"


def test_report_takes_the_latest_study_run_unless_told_the_search_or_a_run_id(tmp_path):
    """A search after a study leaves two parent runs in one experiment: `ptmdd report NAME` means
    the study (--kind search and --run-id pick the others)."""
    import mlflow
    import pytest

    from ptmdd_ray import tracking
    from ptmdd_ray.config import ConfigError
    from ptmdd_ray.rows import find_parent

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = tracking.start_parent(uri, "s", {"ptmdd.kind": "study"})
    search = tracking.start_parent(uri, "s", {"ptmdd.kind": "search"})
    client = mlflow.MlflowClient(uri)
    assert find_parent(client, "s").info.run_id == study
    assert find_parent(client, "s", kind="search").info.run_id == search
    assert find_parent(client, "s", run_id=study).info.run_id == study
    assert client.get_run(search).info.run_name == "s (search)"
    with pytest.raises(ConfigError, match="run-id"):
        find_parent(client, "s", run_id="0" * 32)


def test_an_extension_with_other_seeds_merges_by_seed_and_the_report_says_so(tmp_path):
    """A study run again later with seeds 3-4 extends every point: its rows file and the first
    one make one report whose claims pair 5 seeds; another design or a seed run twice is refused."""
    import copy

    from ptmdd_ray.cli import main
    from ptmdd_ray.rows import merge_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _study_in_mlflow(uri)
    first = from_mlflow(uri, "tiny")
    later = StudyRun("later", {**first.tags, "ptmdd.samples": "2"})
    for r in first.rows:
        if r["sample"] in ("0", "1"):  # samples 0 and 1 of the later invocation are seeds 3 and 4
            r2 = copy.deepcopy(r)
            r2["params"]["seed"] = str(int(r["params"]["seed"]) + 3)
            r2["metrics"] = {k: v + 0.001 for k, v in r["metrics"].items()}
            later.rows.append(r2)
    a, b = write_rows(first, tmp_path / "a.parquet"), write_rows(later, tmp_path / "b.parquet")
    assert main(["report", "--from", str(a), "--from", str(b), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "rows files `a.parquet`, `b.parquet`" in text
    assert "5 samples (seeds) per point, fixed in the study file before it ran, in 2 invocations (3 + 2 samples" in text
    assert "all 2 points finished all of them" in text
    claim = next(ln for ln in text.splitlines() if ln.startswith("| CLoM helps |"))
    assert claim.split(" | ")[3] == "5"  # paired over the five seeds
    with pytest.raises(ConfigError, match=r"from: seed \d of point loss.clom=\S+ is in both a and a2: a trial counted twice"):
        merge_runs([first, first], ["a", "a2"])
    other = StudyRun("o", {**first.tags, "ptmdd.metric": "acc.mean"}, later.rows)
    with pytest.raises(ConfigError, match=r"from: b is another design than a \(ptmdd.metric differs\)"):
        merge_runs([first, other], ["a", "b"])
