"""MLflow tracking: one parent run per study invocation, one nested child run per trial.

Params are the config's flat dotted names (``distill.ipc``, ``pool.archs`` ...), the same vocabulary
as ``--set`` and the sweep keys, so runs can be filtered and compared in the MLflow UI by exactly
the names used to launch them. The default tracking store is a local SQLite file next to the study
results (``<results>/mlflow.db``); ``--mlflow-uri`` points at a server.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import __version__, cost
from .config import Config, ConfigError, flatten, to_dict

log = logging.getLogger(__name__)

PENDING = "mlflow_pending.json"  # beside a trial's result.json: finished while MLflow was away
# MLflow's HTTP retries per call (its default, 7 with back-off, waits minutes): an outage is
# handled (a trial goes offline, the driver leaves the parent to `ptmdd report --sync`), not waited out
HTTP_MAX_RETRIES = 2


def limit_http_retries() -> None:
    """Bound this process's MLflow HTTP retries to :data:`HTTP_MAX_RETRIES` (unless the
    environment already says otherwise): the study's driver and every trial's worker alike."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HTTP_MAX_RETRIES))


def default_tracking_uri(results: str | Path) -> str:
    return f"sqlite:///{Path(results).resolve() / 'mlflow.db'}"


# URL schemes (before any "+driver") that name a database server: MLflow takes them as tracking
# URIs, Optuna as storages. SQLite is a local file and is not checked.
DB_SCHEMES = {"postgresql": "PostgreSQL", "postgres": "PostgreSQL", "mysql": "MySQL", "mariadb": "MariaDB",
              "mssql": "SQL Server", "oracle": "Oracle"}
_DB_PORTS = {"PostgreSQL": 5432, "MySQL": 3306, "MariaDB": 3306, "SQL Server": 1433, "Oracle": 1521}


def redact(uri: str) -> str:
    """``uri`` with the password of its user info (``scheme://user:PASSWORD@host``) shown as
    ``***``: for printing tracking URIs and storages."""
    return re.sub(r"(://[^/@:]*:)[^/]*@", r"\1***@", uri)


def _db_reason(e: BaseException) -> str:
    """The driver's reason, short: libpq's 'connection to server at "h", port p failed: FATAL:
    password authentication failed for user "u"' becomes 'password authentication failed for
    user "u"' (driver messages name the host and user, never the password)."""
    text = str(getattr(e, "orig", None) or e).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    line = line.rsplit("failed: ", 1)[-1].strip()
    for prefix in ("FATAL:", "ERROR:"):
        line = line.removeprefix(prefix).strip()
    return line[:1].lower() + line[1:] if line[1:2].islower() else line


def check_database(url: str, key: str, timeout: float = 5.0) -> None:
    """Fail fast, before anything is started or written, when a database URL (an Optuna storage,
    an MLflow tracking store) cannot be used: a ConfigError naming ``key`` and the server's
    host:port (never the password), e.g. ``optuna-storage: cannot connect to PostgreSQL at
    127.0.0.1:1 (connection refused)``, within about ``timeout`` seconds (the driver's
    connect_timeout). A refused login and a missing database are caught the same way. SQLite URLs
    are left alone (a local file, created on first use)."""
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        return
    import sqlalchemy

    try:
        u = sqlalchemy.engine.make_url(url)
    except Exception:  # noqa: BLE001 - its message quotes the URL, password included
        raise ConfigError(f"{key}: not a database URL (dialect+driver://user:password@host:port/database)") from None
    kind = DB_SCHEMES.get(scheme, scheme or "database")
    where = f"{u.host or 'localhost'}:{u.port or _DB_PORTS.get(kind, '?')}"
    args = {"connect_timeout": max(1, int(timeout))} if kind in _DB_PORTS and kind not in ("SQL Server", "Oracle") else {}
    engine = None
    try:
        engine = sqlalchemy.create_engine(u, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect():
            pass
    except ImportError as e:
        raise ConfigError(f"{key}: {kind} needs the Python driver {u.get_driver_name()!r}, not installed ({e.name or e}; "
                          "pip install 'ptmdd_ray[cluster]')") from None
    except sqlalchemy.exc.NoSuchModuleError:
        raise ConfigError(f"{key}: unknown database kind {u.drivername!r}") from None
    except Exception as e:  # noqa: BLE001 - any failure to connect is this one error
        raise ConfigError(f"{key}: cannot connect to {kind} at {where} ({_db_reason(e)})") from None
    finally:
        if engine is not None:
            engine.dispose()


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail before any trial runs when a tracking server does not answer (a ConfigError naming
    the URI). Any HTTP answer counts, 401 from an auth proxy included. A database tracking URI
    (``postgresql://...``) is connected to instead (:func:`check_database`)."""
    if tracking_uri.split("://", 1)[0].split("+", 1)[0].lower() in DB_SCHEMES:
        check_database(tracking_uri, "mlflow-uri", timeout)
        return
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"mlflow-uri: cannot reach the MLflow server at {tracking_uri} ({reason})") from None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def params_of(cfg: Config) -> dict[str, str]:
    """Flat dotted params; lists and weight maps as compact JSON (MLflow params are strings)."""
    out = {}
    for k, v in flatten(cfg).items():
        out[k] = json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else str(v)
    return out


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """A run's MLflow metrics: ``acc.*`` on test, ``val.acc.*`` on the validation split (what every
    choice reads), ``baseline.random.*`` / ``val.baseline.random.*`` for the random-real subset;
    ``acc.<arch>.run<i>`` is evaluation model i's own score (the per-trial rows keep them all)."""
    m: dict[str, float] = {}
    for prefix, acc_key, base_key in (("", "accuracy", "baseline_random"),
                                      ("val.", "val_accuracy", "baseline_random_val")):
        acc = result.get(acc_key) or {}
        for arch, s in acc.items():
            m[f"{prefix}acc.{arch}.mean"], m[f"{prefix}acc.{arch}.std"] = s["mean"], s["std"]
            for i, a in enumerate(s.get("runs", [])):  # each evaluation model: the raw rows keep them
                m[f"{prefix}acc.{arch}.run{i}"] = a
        if acc:
            m[f"{prefix}acc.mean"] = sum(s["mean"] for s in acc.values()) / len(acc)
        base = result.get(base_key) or {}
        for arch, s in base.items():
            m[f"{prefix}baseline.random.{arch}.mean"] = s["mean"]
        if base:
            m[f"{prefix}baseline.random.mean"] = sum(s["mean"] for s in base.values()) / len(base)
    base = result.get("baseline_random") or {}
    t = result["timing"]
    m["distill.seconds_per_iteration"] = t["seconds_per_iteration"]
    m["distill.seconds"] = t["distill_seconds"]
    m["eval.seconds"] = t["eval_seconds"]
    m["distill.resumed_from"] = float(t.get("resumed_from", 0))  # > 0: went on from a checkpoint
    if result.get("learned_lr") is not None:  # MTT: the step size it learned (its set's evaluation lr)
        m["distill.learned_lr"] = float(result["learned_lr"])
    if base:  # 1: the baseline was read back from the store (eval.seconds then covers the set alone)
        m["baseline.random.cached"] = float(bool(t.get("baseline_cached")))
    return {**m, **cost.flat(result.get("cost") or {})}


def _first_contact(call, tracking_uri: str, wait: float = 90.0):
    """``call()``, a driver's first use of a tracking store (making the client opens the store).
    On a database URI MLflow creates and migrates its tables on first use, and drivers doing that
    at once on a fresh database race (PostgreSQL: a duplicate key in pg_type, or a schema another
    driver is still migrating). A migration is one transaction, so the loser has left nothing
    half-made: it retries, for up to ``wait`` seconds (a migration takes several), and finds the
    tables. Other URIs (a server) are called once."""
    scheme = tracking_uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in DB_SCHEMES and scheme != "sqlite":
        return call()
    deadline = time.monotonic() + wait
    while True:
        try:
            return call()
        except Exception:  # noqa: BLE001 - sqlalchemy's or MLflow's wrapping of it
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5 + random.random())


def start_parent(tracking_uri: str, experiment: str, tags: dict[str, str], artifacts: str | None = None) -> str:
    """Create the study's parent run (RUNNING) and return its id. A new experiment keeps its
    artifacts under ``artifacts`` when given (else wherever the tracking server puts them)."""
    import mlflow

    client = _first_contact(lambda: mlflow.MlflowClient(tracking_uri), tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            exp_id = client.create_experiment(experiment, artifact_location=artifacts)
        except mlflow.exceptions.MlflowException:  # a concurrent driver (a second search) created it meanwhile
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
    if exp is not None:
        exp_id = exp.experiment_id
    _say_kind(client, exp_id)
    kind = tags.get("ptmdd.kind", "study")
    run = client.create_run(exp_id, tags={**tags, "ptmdd.version": __version__, "ptmdd.git_commit": git_commit(),
                                          "ptmdd.role": "study", "ptmdd.kind": kind},
                            run_name=experiment if kind == "study" else f"{experiment} (search)")
    return run.info.run_id


def _say_kind(client, exp_id: str, tries: int = 4) -> None:
    """Tag the experiment a model-training one (MLflow infers an experiment's kind, GenAI or model
    training, and tags it; say it first). Drivers opening a new experiment at once race on the
    tag's insert, and on a tracking server the loser gets the database's duplicate key as an
    error: it finds the tag set, or tries again."""
    import mlflow

    key, value = "mlflow.experimentKind", "custom_model_development"
    for attempt in range(tries):
        if client.get_experiment(exp_id).tags.get(key) == value:
            return
        try:
            client.set_experiment_tag(exp_id, key, value)
            return
        except mlflow.exceptions.MlflowException:
            if attempt == tries - 1:
                raise
            time.sleep(0.2 + random.random() * 0.3)


def ui_url(tracking_uri: str, experiment_id: str) -> str:
    """The runs table of an experiment in the MLflow UI. ``workflowType=machine_learning`` opens
    the "Model training" view: MLflow 3's default view of a new browser is GenAI's, which shows
    an empty traces page. A tracking server is its own UI; a database opens in ``mlflow ui``
    (127.0.0.1:5000)."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_command(tracking_uri: str) -> str | None:
    """How to open the UI on a tracking database (None: a server is already one)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {redact(tracking_uri)}"


def reopen_parent(tracking_uri: str, run_id: str) -> bool:
    """Continue an interrupted study's parent run (``--resume``): RUNNING again, and every child
    still RUNNING belonged to an attempt that died with the old driver, so it is marked FAILED.
    False when the run no longer exists (then a new parent is started)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    try:
        parent = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    if parent.info.lifecycle_stage != "active":
        return False
    client.update_run(run_id, status="RUNNING")
    for child in children(client, parent.info.experiment_id, run_id, status="RUNNING"):
        fail_stale(client, child.info.run_id, "its driver died (found RUNNING on --resume)")
    return True


def children(client, experiment_id: str, parent_id: str, status: str | None = None, trial_key: str | None = None):
    where = [f"tags.`mlflow.parentRunId` = '{parent_id}'"]
    if status:
        where.append(f"attributes.status = '{status}'")
    if trial_key:
        where.append(f"tags.`ptmdd.trial_key` = '{trial_key}'")
    return client.search_runs([experiment_id], " and ".join(where), max_results=50000)


def fail_stale(client, run_id: str, reason: str, deterministic: bool = False) -> None:
    """Mark a run FAILED with its reason; ``deterministic`` failures (a diverging distillation, an
    invalid config) would fail again the same way, so retries of the trial do not re-run them."""
    client.set_tag(run_id, "ptmdd.failure", reason)
    if deterministic:
        client.set_tag(run_id, "ptmdd.deterministic", "true")
    client.set_terminated(run_id, "FAILED")


def claim_trial(tracking_uri: str, parent_id: str, trial_key: str) -> tuple[dict[str, float] | None, str | None]:
    """Before a trial attempt runs: (metrics of an earlier FINISHED run of the same trial, reason
    of an earlier deterministic failure of it). With metrics the attempt reports them instead of
    running again (a resumed study never repeats finished work); with a reason it fails at once.
    Runs of this trial still RUNNING are dead attempts (Tune runs one attempt of a trial at a time)
    and are marked FAILED, so a trial ends with exactly one FINISHED run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp_id = client.get_run(parent_id).info.experiment_id
    runs = children(client, exp_id, parent_id, trial_key=trial_key)
    for r in runs:
        if r.info.status == "FINISHED":
            return dict(r.data.metrics), None
    for r in runs:
        if r.info.status == "RUNNING":
            fail_stale(client, r.info.run_id, "its worker died mid-trial (found RUNNING by the retry)")
        elif r.info.status == "FAILED" and r.data.tags.get("ptmdd.deterministic") == "true":
            return None, r.data.tags.get("ptmdd.failure", "failed")
    return None, None


def end_stopped(tracking_uri: str, parent_id: str, trial_key: str, reason: str) -> None:
    """Close the run of a trial the scheduler stopped, if it is still RUNNING: KILLED, tagged
    ``ptmdd.stopped`` (the driver's side of what the trial's worker does when it gets the time).
    An unreachable MLflow only leaves it to :func:`close_parent`."""
    import mlflow

    try:
        client = mlflow.MlflowClient(tracking_uri)
        exp_id = client.get_run(parent_id).info.experiment_id
        for run in children(client, exp_id, parent_id, status="RUNNING", trial_key=trial_key):
            client.set_tag(run.info.run_id, "ptmdd.stopped", reason)
            client.set_terminated(run.info.run_id, "KILLED")
    except Exception as e:  # noqa: BLE001 - the tracking server is away; close_parent fails it later
        log.warning("could not close the stopped trial's run (%s)", e)


def experiment_of(tracking_uri: str, run_id: str) -> str | None:
    import mlflow

    try:
        return mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - MLflow away at the end: no link to print
        return None


def log_parent_summary(tracking_uri: str, run_id: str, metrics: dict[str, float], files: list[Path]) -> None:
    """Summary metrics (``best.acc.mean``, ``trials.finished``, ...) and files onto the parent run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for f in files:
        client.log_artifact(run_id, str(f))


def close_parent(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """End the study's parent run; a child still RUNNING now was stopped by Tune (or its attempt
    died with no retry left) and is marked FAILED, so no run stays RUNNING forever."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp_id = client.get_run(run_id).info.experiment_id
    for child in children(client, exp_id, run_id, status="RUNNING"):
        fail_stale(client, child.info.run_id, "stopped before it finished")
    client.set_terminated(run_id, status)


def log_trial(tracking_uri: str, parent_id: str, cfg: Config, tags: dict[str, str]):
    """Open a nested child run under ``parent_id``; returns (client, run_id)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(parent_id)
    run = client.create_run(parent.info.experiment_id, tags={
        **tags, "mlflow.parentRunId": parent_id, "ptmdd.version": __version__,
        "ptmdd.git_commit": parent.data.tags.get("ptmdd.git_commit", "unknown"), "ptmdd.role": "trial"},
        run_name=tags.get("ptmdd.run_name") or tags.get("ptmdd.trial_id"))
    params = params_of(cfg)
    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
    log_dataset(client, run.info.run_id, cfg)
    return client, run.info.run_id


def log_dataset(client, run_id: str, cfg: Config | dict) -> None:
    """Link the run to its data set. MLflow inserts a data set once per experiment; two trials
    inserting the same one at the same moment collide on that (a unique constraint), and the
    loser finds it inserted when it tries again."""
    try:
        client.log_inputs(run_id, datasets=[dataset_input(cfg)])
    except Exception:  # noqa: BLE001 - the concurrent insert; a real outage fails again below
        time.sleep(0.2 + random.random())
        client.log_inputs(run_id, datasets=[dataset_input(cfg)])


def dataset_input(cfg: Config | dict):
    """The target data set as an MLflow dataset input (the runs table's Dataset column): its name,
    a digest of what it reads and how it is cut (files, classes, subsets, validation split), and
    that cut as the profile."""
    import mlflow

    from .config import DatasetConfig, from_dict
    from .sources import source_id

    ds = cfg.dataset if isinstance(cfg, Config) else from_dict(DatasetConfig, cfg["dataset"], "dataset.")
    cut = {k: v for k, v in to_dict(ds).items() if k not in ("root", "download", "cache_dir")}
    digest = hashlib.sha256(json.dumps([source_id(ds), cut], sort_keys=True).encode()).hexdigest()[:12]
    name = ds.name.split(":", 1)[-1].rsplit("/", 1)[-1]
    where = ds.name.split(":", 1)[1] if ":" in ds.name else ds.name
    dataset = mlflow.entities.Dataset(name=name, digest=digest, source_type="local" if "://" not in where else
                                      where.split("://", 1)[0], source=json.dumps({"uri": where}),
                                      profile=json.dumps(cut, sort_keys=True))
    return mlflow.entities.DatasetInput(dataset, tags=[mlflow.entities.InputTag("mlflow.data.context", "training")])


def log_result(client, run_id: str, result: dict[str, Any], out_dir: Path,
               extra: dict[str, float] | None = None) -> None:
    import mlflow

    values = {**metrics_of(result), **(extra or {})}
    now = int(time.time() * 1000)
    metrics = [mlflow.entities.Metric(k, float(v), now, 0) for k, v in values.items()]
    metrics += [mlflow.entities.Metric("distill.loss", float(v), now, int(step)) for step, v in result["loss_history"]]
    along = "val.acc.intermediate" if result.get("eval_split") == "val" else "acc.intermediate"
    metrics += [mlflow.entities.Metric(along, float(v), now, int(step)) for step, v in result.get("eval_history", [])]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i:i + 500])
    (out_dir / "pool.json").write_text(json.dumps(result["pool"], indent=1))
    for name in ("synthetic.parquet", "synthetic.png", "result.json", "pool.json"):
        if (out_dir / name).exists():
            client.log_artifact(run_id, str(out_dir / name))


class TrialRun:
    """A trial's child run that survives an MLflow outage: when a call fails (server away), the
    run goes offline and the trial carries on; its result stays in ``result.json`` (and in Tune's
    results) with a ``mlflow_pending.json`` beside it, which :func:`sync_pending` (run by the
    study's driver at its end and by ``ptmdd report --sync``) logs once MLflow is back."""

    def __init__(self, tracking_uri: str, parent_id: str, trial_key: str):
        # an outage should cost a trial seconds, not MLflow's default minutes of retries
        limit_http_retries()
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.uri, self.parent, self.key = tracking_uri, parent_id, trial_key
        self.client, self.run_id, self.online = None, None, True

    def _try(self, what: str, fn, *args, **kwargs):
        if not self.online:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the tracking server
            log.warning("MLflow unreachable (%s: %s); the trial goes on, its result will be synced", what, e)
            self.online = False
            return None

    def claim(self) -> tuple[dict[str, float] | None, str | None]:
        return self._try("claim", claim_trial, self.uri, self.parent, self.key) or (None, None)

    def start(self, cfg: Config | dict, tags: dict[str, str]) -> None:
        self.tags = {**tags, "ptmdd.trial_key": self.key}
        opened = self._try("start", log_trial, self.uri, self.parent, cfg, self.tags)
        if opened:
            self.client, self.run_id = opened

    def finish(self, result: dict[str, Any], out: Path, extra: dict[str, float]) -> None:
        if self.run_id:
            self._try("log", log_result, self.client, self.run_id, result, out, extra)
            self._try("finish", self.client.set_terminated, self.run_id, "FINISHED")
        if not self.online:
            from .artifacts import write_json

            write_json(out / PENDING, {"parent": self.parent, "run_id": self.run_id, "tags": self.tags,
                                       "extra": extra})

    def end(self, status: str, tags: dict[str, str]) -> None:
        if self.run_id:
            for k, v in tags.items():
                self._try("tag", self.client.set_tag, self.run_id, k, v)
            self._try("end", self.client.set_terminated, self.run_id, status)


def sync_pending(tracking_uri: str, results: str | Path) -> int:
    """Log the trials that finished while MLflow was unreachable (their ``mlflow_pending.json``
    under ``results``), each as the FINISHED child run of its parent unless one already exists;
    then close a parent run its driver could not close. Returns the number of runs logged."""
    import mlflow

    from .artifacts import write_json

    client = mlflow.MlflowClient(tracking_uri)
    logged = 0
    for marker in sorted(Path(results).glob(f"*/*/out/{PENDING}")):
        pending = json.loads(marker.read_text())
        out = marker.parent
        result = json.loads((out / "result.json").read_text())
        parent = client.get_run(pending["parent"])
        key = pending["tags"]["ptmdd.trial_key"]
        if not children(client, parent.info.experiment_id, parent.info.run_id, status="FINISHED", trial_key=key):
            run_id = pending.get("run_id")
            if run_id is None:
                _, run_id = log_trial(tracking_uri, parent.info.run_id, result["config"], pending["tags"])
            log_result(client, run_id, result, out, pending.get("extra"))
            client.set_tag(run_id, "ptmdd.synced", "true")
            client.set_terminated(run_id, "FINISHED")
            logged += 1
        elif pending.get("run_id"):  # the trial's retry logged it meanwhile; this attempt's run is spare
            fail_stale(client, pending["run_id"], "superseded by another attempt of the trial")
        marker.unlink()
    for record in Path(results).glob("*/mlflow_parent.json"):
        saved = json.loads(record.read_text())
        if saved.get("close") and saved.get("tracking_uri") == redact(tracking_uri):
            close_parent(tracking_uri, saved["run_id"], saved.pop("close"))
            write_json(record, saved)
    return logged
