"""The study's MLflow parent run: opened (or reopened on ``--resume``) with the study's design as
tags, summarised at the end (the best point on the mean over samples, the report and the per-trial
rows), and closed, or left for ``ptmdd report --sync`` when MLflow is away."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..artifacts import read_json, write_json
from ..config import to_dict
from ..report import write_report
from ..rows import from_mlflow, write_rows
from ..study_spec import Study, StudyConfig, objectives

log = logging.getLogger(__name__)


def open_parent(tracking, mlflow_uri: str, study: Study, swept: list[str], exp_path: str, resume: bool,
                artifacts_uri: str | None, select_on_test: bool = False, kind: str = "study",
                optuna_storage: str | None = None) -> str:
    """The study's MLflow parent run: the interrupted one again on ``--resume`` (its id is kept in
    the Tune experiment directory, local or in the bucket), else a new one. A search's parent names
    its objectives and its Optuna storage (without a password), which its report reads."""
    record = f"{exp_path}/mlflow_parent.json"
    saved = read_json(record) if resume else None
    same = saved and saved.get("tracking_uri") == tracking.redact(mlflow_uri)  # kept without its password
    if same and tracking.reopen_parent(mlflow_uri, saved["run_id"]):
        log.info("continuing MLflow parent run %s", saved["run_id"])
        return saved["run_id"]
    spec = study.spec
    parent = tracking.start_parent(mlflow_uri, spec.name, {
        "ptmdd.study": spec.name, "ptmdd.kind": kind, "ptmdd.swept": ",".join(swept), "ptmdd.matrix": spec.matrix or "",
        "ptmdd.control": json.dumps(spec.control, sort_keys=True) if spec.control is not None else "",
        "ptmdd.control_added": str(study.control_added).lower(),
        "ptmdd.cases": json.dumps(spec.cases, sort_keys=True, default=str),
        "ptmdd.claims": json.dumps([to_dict(c) for c in spec.claims]), "ptmdd.metric": spec.metric,
        "ptmdd.samples": str(spec.samples),
        **({"ptmdd.objectives": json.dumps(objectives(spec)), "ptmdd.optuna_storage": tracking.redact(optuna_storage)}
           if optuna_storage else {}),
        **({"ptmdd.select_on_test": "true"} if select_on_test else {})}, artifacts_uri)
    write_json(record, {"run_id": parent, "tracking_uri": tracking.redact(mlflow_uri)})
    # the data set row exists before the trials link to it (the study's data, on its parent)
    import mlflow
    tracking.log_dataset(mlflow.MlflowClient(mlflow_uri), parent, study.trial_config(study.grid[0], 0))
    return parent


def close_parent(tracking, mlflow_uri: str, parent: str, status: str, results: str, exp_path: str) -> None:
    """Log what trials could not (MLflow away mid-study) and close the parent run; if MLflow is
    still away, leave both to ``ptmdd report --sync`` (the parent record says how to close it)."""
    try:
        synced = tracking.sync_pending(mlflow_uri, results) if "://" not in results else 0
        if synced:
            log.info("logged %d trial(s) that finished while MLflow was unreachable", synced)
        tracking.close_parent(mlflow_uri, parent, status)
    except Exception as e:  # noqa: BLE001 - the tracking server is away; nothing is lost
        record = f"{exp_path}/mlflow_parent.json"
        write_json(record, {**(read_json(record) or {}), "close": status})
        log.warning("MLflow unreachable at the end of the study (%s); results are in %s: run `ptmdd report "
                    "%s --sync --mlflow-uri %s --results %s --out DIR` once it is back", e, exp_path,
                    exp_path.rsplit("/", 1)[-1], tracking.redact(mlflow_uri), results)


def summarise_parent(tracking, mlflow_uri: str, parent: str, study: Study, rows: list[dict[str, Any]],
                     local_results: str | None, exp_name: str, optuna_storage: str | None = None) -> None:
    """The parent run's summary metrics, the study file and the report, so that the experiment's
    runs table and the parent's page say how the study came out. MLflow away: logged to the log."""
    import tempfile

    import yaml

    spec = study.spec
    metrics = summary_metrics(spec, rows)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            where = Path(local_results, exp_name, "report") if local_results else Path(tmp, "report")
            study_file = Path(tmp, "study.yaml")
            study_file.write_text(yaml.safe_dump(to_dict(spec), sort_keys=False))
            tracking.log_parent_summary(mlflow_uri, parent, metrics, [study_file])
            if metrics["trials.finished"]:
                run = from_mlflow(mlflow_uri, spec.name, parent)
                write_report(mlflow_uri, spec.name, where, run=run, optuna_storage=optuna_storage)
                # the per-trial rows beside the report: what `ptmdd report --from` re-derives it from
                tracking.log_parent_summary(mlflow_uri, parent, {}, [write_rows(run, Path(where, "rows.parquet"))])
    except Exception as e:  # noqa: BLE001 - the summary is a convenience; the trials are logged
        log.warning("could not log the study's summary to MLflow (%s): %s", type(e).__name__, e)


def summary_metrics(spec: StudyConfig, rows: list[dict[str, Any]]) -> dict[str, float]:
    """The parent run's metrics: the grid point best on the study's metric *averaged over its
    samples* (a max over single trials would be optimistic: the luckiest seed), with that mean and
    the point's mean test accuracy; the plain method's and the random-real baseline's mean test
    accuracy; and the counts of finished, pruned and failed trials. ``rows``: {overrides, metrics, error}."""
    import statistics

    done = [r for r in rows if not r["error"] and (r["metrics"] or {}).get("trial.final")]
    out = {"trials.finished": float(len(done)), "trials.failed": float(sum(bool(r["error"]) for r in rows)),
           "trials.pruned": float(len(rows) - len(done) - sum(bool(r["error"]) for r in rows))}
    points: dict[str, list[dict[str, Any]]] = {}
    for r in done:
        if spec.metric in r["metrics"]:
            points.setdefault(json.dumps(r["overrides"], sort_keys=True, default=str), []).append(r["metrics"])
    if points:
        mean = {k: statistics.fmean(m[spec.metric] for m in ms) for k, ms in points.items()}
        best = (max if spec.mode == "max" else min)(mean, key=mean.get)
        out[f"best.{spec.metric}"] = mean[best]
        tests = [m["acc.mean"] for m in points[best] if "acc.mean" in m]
        if tests:
            out["best.acc.mean"] = statistics.fmean(tests)
        out["best.n"] = float(len(points[best]))
    for name, members in (("control.acc.mean", [r for r in done if spec.control is not None
                                                and r["overrides"] == spec.control]),
                          ("baseline.random.mean", done)):
        key = "baseline.random.mean" if name.startswith("baseline") else "acc.mean"
        values = [r["metrics"][key] for r in members if key in r["metrics"]]
        if values:
            out[name] = statistics.fmean(values)
    return out

