"""A study invocation's per-trial rows: read back from MLflow, or from a small Parquet file that
can be committed beside the figures it backs.

Every verdict a report gives is a function of these rows and the parent run's ``ptmdd.*`` tags
(the claims, the control, the metric, the swept keys), so a file holding both lets a reviewer
re-derive a table without the MLflow database that produced it (``ptmdd rows`` writes one,
``ptmdd report --from FILE`` reads it). One row per FINISHED trial: its study, grid point (as
given in the study file), sample and seed, the code commit it ran, its flat config and every
metric it logged (test and validation accuracy per evaluation architecture and per evaluation
model, the random-real baseline, timings).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError
from .study_spec import label

ROW_COLUMNS = ("study", "parent_run_id", "run_id", "point", "sample", "seed", "commit", "params")
TAGS_KEY = b"ptmdd.tags"  # the Parquet schema metadata that holds the parent run's tags
# What makes two invocations one study: the same points, control, claims and metric
DESIGN_TAGS = ("ptmdd.study", "ptmdd.swept", "ptmdd.cases", "ptmdd.control", "ptmdd.control_added",
               "ptmdd.claims", "ptmdd.metric", "ptmdd.matrix")


@dataclass
class StudyRun:
    """One invocation of a study as a report reads it: the parent run's id and tags, and a row
    per finished trial ({values, params, metrics, point, sample, run_id, commit})."""

    run_id: str
    tags: dict[str, str]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def swept(self) -> list[str]:
        return [k for k in self.tags.get("ptmdd.swept", "").split(",") if k]

    @property
    def study(self) -> str:
        return self.tags.get("ptmdd.study", "")


def _values(point: dict[str, Any], params: dict[str, str], swept: list[str]) -> dict[str, str]:
    """The labels of a trial's swept values, from its grid point as given (a mapping-valued key
    such as ``pool.source`` is one value, not many params)."""
    return {k: label(point[k]) if k in point else params.get(k, "-") for k in swept}


def find_parent(client, study: str, run_id: str | None = None, kind: str = "study"):
    """The parent run a report is about: ``run_id`` if given, else the latest parent run of
    ``kind`` (``study``: a grid; ``search``: an Optuna search) in the study's experiment."""
    exp = client.get_experiment_by_name(study)
    if exp is None:
        raise ConfigError(f"study: no MLflow experiment named {study!r}")
    if run_id is not None:
        try:
            parent = client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MLflow's RESOURCE_DOES_NOT_EXIST
            raise ConfigError(f"run-id: no run {run_id!r}") from None
        if parent.info.experiment_id != exp.experiment_id or parent.data.tags.get("ptmdd.role") != "study":
            raise ConfigError(f"run-id: {run_id} is not a parent run of study {study!r}")
        return parent
    parents = client.search_runs([exp.experiment_id], "tags.`ptmdd.role` = 'study'",
                                 order_by=["attributes.start_time DESC"], max_results=1000)
    # runs from before the kind tag are studies
    parents = [p for p in parents if p.data.tags.get("ptmdd.kind", "study") == kind]
    if not parents:
        raise ConfigError(f"study: experiment {study!r} has no {kind} run" + (
            " (a search's report: --kind search)" if kind == "study" else ""))
    return parents[0]


def from_mlflow(tracking_uri: str, study: str, run_id: str | None = None, kind: str = "study") -> StudyRun:
    """The study's most recent invocation of ``kind`` (or ``run_id``) with its FINISHED trials."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    parent = find_parent(client, study, run_id, kind)
    tags = {k: v for k, v in parent.data.tags.items() if k.startswith("ptmdd.")}
    run = StudyRun(parent.info.run_id, tags)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                  "attributes.status = 'FINISHED'", max_results=10000)
    for c in children:
        point = json.loads(c.data.tags.get("ptmdd.point", "{}"))
        run.rows.append({"values": _values(point, c.data.params, run.swept), "params": dict(c.data.params),
                         "metrics": dict(c.data.metrics), "point": point,
                         "sample": c.data.tags.get("ptmdd.sample", "0"), "run_id": c.info.run_id,
                         "commit": c.data.tags.get("ptmdd.git_commit", "unknown")})
    return run


def write_rows(run: StudyRun, path: str | Path) -> Path:
    """The rows as one Parquet file (a row per trial, a float column per metric, null where a
    trial did not log it) with the parent's tags in the schema metadata; written whole or not at
    all (a temporary file renamed into place)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(run.rows, key=lambda r: (json.dumps(r["point"], sort_keys=True, default=str), int(r["sample"])))
    metrics = sorted({k for r in rows for k in r["metrics"]})
    columns: dict[str, list] = {
        "study": [run.study] * len(rows), "parent_run_id": [run.run_id] * len(rows),
        "run_id": [r.get("run_id", "") for r in rows],
        "point": [json.dumps(r["point"], sort_keys=True, default=str) for r in rows],
        "sample": [int(r["sample"]) for r in rows],
        "seed": [int(r["params"]["seed"]) if "seed" in r["params"] else None for r in rows],
        "commit": [r.get("commit", "unknown") for r in rows],
        "params": [json.dumps(r["params"], sort_keys=True) for r in rows]}
    for m in metrics:
        columns[m] = [r["metrics"].get(m) for r in rows]
    table = pa.table({k: pa.array(v, type=pa.float64() if k in metrics else None) for k, v in columns.items()})
    table = table.replace_schema_metadata({TAGS_KEY: json.dumps(run.tags, sort_keys=True).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_rows(path: str | Path) -> StudyRun:
    """A rows file back as the report reads MLflow: one line naming the file if it is not one."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # missing, unreadable or not Parquet
        raise ConfigError(f"from: {path}: not a rows file ({str(e).splitlines()[0]})") from None
    meta = table.schema.metadata or {}
    missing = [c for c in ROW_COLUMNS if c not in table.column_names]
    if TAGS_KEY not in meta or missing:
        raise ConfigError(f"from: {path}: not a rows file (written by `ptmdd rows`); missing "
                          f"{', '.join(missing) or 'the study tags'}")
    tags = json.loads(meta[TAGS_KEY])
    data = table.to_pylist()
    run = StudyRun(data[0]["parent_run_id"] if data else "", tags)
    for d in data:
        point, params = json.loads(d["point"]), json.loads(d["params"])
        metrics = {k: v for k, v in d.items() if k not in ROW_COLUMNS and v is not None}
        run.rows.append({"values": _values(point, params, run.swept), "params": params, "metrics": metrics,
                         "point": point, "sample": str(d["sample"]), "run_id": d["run_id"], "commit": d["commit"]})
    return run


def merge_runs(runs: list[StudyRun], names: list[str]) -> StudyRun:
    """Several invocations of one study (e.g. an extension run later with other seeds) as one:
    the design must be the same (the tags of :data:`DESIGN_TAGS`), trials pair by seed instead of
    by sample number (each invocation counts its samples from 0), and a seed run twice for the
    same point is refused rather than counted twice. ``names``: how the errors name each run."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    for run, name in zip(runs[1:], names[1:]):
        differ = [k for k in DESIGN_TAGS if run.tags.get(k) != first.tags.get(k)]
        if differ:
            raise ConfigError(f"from: {name} is another design than {names[0]} ({differ[0]} differs); "
                              "an extension of a study keeps its points, control, claims and metric")
    merged = StudyRun("+".join(r.run_id for r in runs), dict(first.tags))
    merged.tags["ptmdd.invocations"] = json.dumps([{"run_id": r.run_id, "samples": r.tags.get("ptmdd.samples")}
                                                   for r in runs])
    fixed = [r.tags.get("ptmdd.samples") for r in runs]
    if all(fixed):
        merged.tags["ptmdd.samples"] = str(sum(int(n) for n in fixed))
    else:
        merged.tags.pop("ptmdd.samples", None)
    seen: dict[tuple[str, str], str] = {}
    for run, name in zip(runs, names):
        for r in run.rows:
            seed = str(r["params"].get("seed", r["sample"]))
            key = (json.dumps(r["point"], sort_keys=True, default=str), seed)
            if key in seen:
                raise ConfigError(f"from: seed {seed} of point {label(r['point']) or 'base'} is in both {seen[key]} "
                                  f"and {name}: a trial counted twice")
            seen[key] = name
            merged.rows.append({**r, "sample": seed})
    return merged
