"""Running a study: Ray Tune trials, every one a full ``run_distill``, tracked in MLflow.

:mod:`ptmdd_ray.study_spec` says what a study is and checks it; this module runs it, in three
steps (:func:`run_study`): set up (check what can be checked, join Ray, start the store actor,
open the MLflow parent run, share the data), run (the grid or the Optuna searcher, the Tuner, its
fit) and summarise (the parent run's metrics and report, the summary). Trials share the PTM store
through its Ray actor (so a PTM is trained once per study, not once per trial) and report to
MLflow as nested runs of one parent. A trial is :func:`trial`, a module-level function that Tune
hands a :class:`TrialContext` (``tune.with_parameters``) rather than a closure over the driver's
locals.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import tracking
from .artifacts import read_json, write_json
from .config import Config, ConfigError, eval_split, to_dict
from .proc import memory_mb, process_start_time, reset_peak_memory
from .report import write_report
from .rows import from_mlflow, write_rows
from .study_spec import Study, StudyConfig, check_selection, metric_split, optuna_space, run_name

log = logging.getLogger(__name__)

PRUNED_REASON = "pruned by the scheduler on its intermediate evaluations"


class TrialFailed(RuntimeError):
    """A trial that failed deterministically in an earlier attempt (its reason repeated)."""


# ------------------------------------------------------------------ the driver


@dataclass(frozen=True)
class StudyPlan:
    """How and where one call of :func:`run_study` runs, resolved and checked before anything is
    started or written."""

    address: str | None  # the Ray cluster (None: RAY_ADDRESS, else a local Ray)
    results: str  # where Tune keeps the experiment: an absolute local path, or a URI every node reaches
    local_results: str | None  # the same when local: the default MLflow and Optuna files live there
    mlflow_uri: str
    artifacts_uri: str | None  # the local default's artifact root, beside its database (a server decides its own)
    store_uri: str  # one absolute path or URI: trials run in directories of their own, one store actor
    exp_name: str  # the Tune experiment: the study's name, or a search invocation's own
    optuna_storage: str | None  # a search's Optuna storage (given, or SQLite in the results)
    search_trials: int
    resume: bool
    share_data: bool
    prune: bool
    on_test: bool  # a test metric chooses (--select-on-test): the parent run is tagged
    quiet: bool
    reuse_actors: bool

    @property
    def exp_path(self) -> str:
        return f"{self.results}/{self.exp_name}"

    @property
    def kind(self) -> str:
        return "search" if self.search_trials else "study"


def run_study(study: Study, address: str | None = None, mlflow_uri: str | None = None, store: str | None = None,
              results: str = "runs/studies", resume: bool = False, search_trials: int = 0,
              optuna_storage: str | None = None, share_data: bool = True, prune: bool = False,
              select_on_test: bool = False, quiet: bool = False, reuse_actors: bool = True) -> dict[str, Any]:
    """Run the sweep (or, with ``search_trials``, the Optuna search) with Ray Tune, a local Ray
    when no address is given; returns a summary.

    Exactly once: every trial attempt first asks MLflow for a FINISHED run of the same trial (see
    :func:`trial_key`) and reports that instead of running again, and marks runs of it left
    RUNNING by a dead attempt FAILED. So a retried trial (worker killed) or a resumed study
    (driver killed) ends with one FINISHED run per trial, and finished work is never repeated.
    Trials report their intermediate evaluations (``eval.every``) to Tune; with ``prune`` an
    asynchronous successive-halving scheduler (ASHA) stops the trials that trail at the same
    iteration, and Optuna records them as PRUNED. Both choose on the study's metric, which must be a
    validation metric unless ``select_on_test`` (then the parent run is tagged
    ``ptmdd.select_on_test``). ``share_data=False`` loads the data set in every trial (only for the
    memory benchmark); ``quiet`` silences Tune's progress table. A slot's trials run one after the
    other in one worker process (Tune's ``reuse_actors``), which starts, imports torch and MLflow and
    opens the tracking store once, not once per trial; ``reuse_actors=False`` starts a process per
    trial (the scheduling benchmark's comparison). The summary's ``timing`` holds the driver's
    stages (unix times); each trial's final Tune report, its phases (``time.*``)."""
    stages = {"start": time.time()}  # the driver's phases (unix times): the summary's "timing"
    plan = _plan(study, address, mlflow_uri, store, results, resume, search_trials, optuna_storage, share_data,
                 prune, select_on_test, quiet, reuse_actors)
    data = _load_checked_data(study, plan)
    stages["checked"] = time.time()
    ctx = _set_up(study, plan, data, stages)
    del data  # the driver keeps no copy: trials map the shared one, or load their own
    grid = _fit(study, plan, ctx, stages)
    return _summarise(study, plan, ctx, grid, stages)


def _plan(study: Study, address: str | None, mlflow_uri: str | None, store: str | None, results: str, resume: bool,
          search_trials: int, optuna_storage: str | None, share_data: bool, prune: bool, select_on_test: bool,
          quiet: bool, reuse_actors: bool) -> StudyPlan:
    """The call's options resolved, and everything about them that can be checked checked (the
    metric, the results location, MLflow, the Optuna storage, the Ray address): nothing started
    or written yet."""
    spec = study.spec
    check_selection(study, bool(search_trials), prune, select_on_test)
    results, local_results = _results_location(results, mlflow_uri)
    if mlflow_uri:
        tracking.check_reachable(mlflow_uri)
    if search_trials and optuna_storage:
        tracking.check_database(optuna_storage, "optuna-storage")
    if search_trials and not optuna_storage and local_results is None:
        raise ConfigError(f"optuna-storage: --results {results} is not a local directory, so the default "
                          "Optuna SQLite file cannot live there: give --optuna-storage (e.g. postgresql://...)")
    check_address(address)
    store_uri = store or study.trial_config(study.grid[0], 0).store
    if "://" not in store_uri:
        store_uri = str(Path(store_uri).expanduser().resolve())
    return StudyPlan(
        address=address, results=results, local_results=local_results,
        # The local default keeps artifacts beside its database (MLflow's own default is ./mlruns of
        # whatever directory the driver happens to run in); a server decides for itself.
        mlflow_uri=mlflow_uri or tracking.default_tracking_uri(local_results),
        artifacts_uri=None if mlflow_uri else Path(local_results, "mlartifacts").as_uri(), store_uri=store_uri,
        # a search never resumes (its Optuna study continues instead), so each invocation gets an
        # experiment directory of its own: concurrent searches may share --results
        exp_name=_search_experiment_name(spec.name) if search_trials else spec.name,
        optuna_storage=(optuna_storage or f"sqlite:///{Path(local_results or '.') / 'optuna.db'}")
        if search_trials else None,
        search_trials=search_trials, resume=resume, share_data=share_data, prune=prune,
        # any test metric chooses on test (a search's best trial, or the best point the parent
        # run names): said in MLflow and the report, never silently
        on_test=metric_split(spec.metric) == "test",
        quiet=quiet, reuse_actors=reuse_actors)


def _load_checked_data(study: Study, plan: StudyPlan):
    """The data, once: a split or an IPC that does not fit is one line here, not a failed trial
    each; and a store that could not take checkpoints, found out before any training."""
    from .data import load_data
    from .pipeline import check_ipc
    from .store import CheckpointStore

    first = study.trial_config(study.grid[0], 0)
    data = load_data(first.dataset, first.seed)
    check_ipc(data, max(study.trial_config(p, 0).distill.ipc for p in study.grid))
    CheckpointStore(plan.store_uri).check_writable()
    return data


def _set_up(study: Study, plan: StudyPlan, data, stages: dict[str, float]) -> TrialContext:
    """Join Ray, start the store actor, open the MLflow parent run and share the data: what every
    trial needs, as the context Tune hands it."""
    import ray

    from .service import get_store_actor

    connect_ray(plan.address)
    stages["ray"] = time.time()
    # the store actor (a worker process of its own) starts while the driver opens MLflow and Tune
    # sets up, rather than while the first trials wait for it
    get_store_actor(plan.store_uri)
    if plan.local_results:
        Path(plan.local_results).mkdir(parents=True, exist_ok=True)
    tracking.limit_http_retries()
    swept = _swept(study, plan)
    parent = _open_parent(tracking, plan.mlflow_uri, study, swept, plan.exp_path, plan.resume, plan.artifacts_uri,
                          plan.on_test, plan.kind)
    shared = _shares_data(study, plan, swept)
    stages["parent"] = time.time()
    return TrialContext(study=study, store_uri=plan.store_uri, mlflow_uri=plan.mlflow_uri, parent=parent,
                        swept=tuple(swept), search=bool(plan.search_trials), experiment_uri=plan.exp_path,
                        data_ref=ray.put(data.to_arrays()) if shared else None)


def _swept(study: Study, plan: StudyPlan) -> list[str]:
    """The keys a study varies (its search space's, for a search), the added control's aside."""
    points = study.grid[:-1] if study.control_added else study.grid
    return sorted(study.spec.search) if plan.search_trials else sorted({k for p in points for k in p})


def _shares_data(study: Study, plan: StudyPlan, swept: list[str]) -> bool:
    """The target data go into the object store once, as numpy buffers that every trial on a node
    maps read-only (zero-copy; one copy per node), unless trials would load different data (a
    swept dataset key, or seed-dependent per-class subsets)."""
    first = study.trial_config(study.grid[0], 0)
    return plan.share_data and not any(k.startswith("dataset.") for k in swept) and not (
        first.dataset.train_per_class or first.dataset.test_per_class)


def _fit(study: Study, plan: StudyPlan, ctx: TrialContext, stages: dict[str, float]):
    """The trials on Tune (the grid, or the Optuna searcher's), to the end; the parent run closed
    FAILED if Tune itself fails (or the driver is interrupted)."""
    from ray import tune

    spec = study.spec
    trainable = tune.with_resources(tune.with_parameters(trial, ctx=ctx),
                                    {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    # progress reports (iteration, loss) come between the scored ones: Tune must not demand the
    # metric in each (ASHA and the Optuna searcher skip reports without it)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    searcher, param_space, num_samples = _searcher(study, plan, ctx)
    try:
        tuner = _tuner(study, plan, trainable, searcher, param_space, num_samples)
        with contextlib.redirect_stdout(io.StringIO()) if plan.quiet else contextlib.nullcontext():
            stages["fit"] = time.time()
            grid = tuner.fit()  # Tune prints its tables whatever its verbosity: quiet keeps them from stdout
            stages["fitted"] = time.time()
    except BaseException:
        _close(tracking, plan.mlflow_uri, ctx.parent, "FAILED", plan.results, plan.exp_path)
        raise
    _keep_last_checkpoints(grid)
    return grid


def _keep_last_checkpoints(grid) -> None:
    """Delete every trial's checkpoints but its last, once the study is over.

    Tune keeps them all while the study runs (``CheckpointConfig(num_to_keep=None)``). Tune's own
    pruning deletes an old checkpoint the moment a newer one registers, but the experiment's
    snapshot on storage names the latest checkpoint as of its last upload: a driver killed in
    between leaves a snapshot naming a deleted checkpoint, and the resumed study fails with "Could
    not recover from checkpoint as it does not exist on storage anymore" (seen on S3, where the
    upload takes longest). After ``fit`` returns, the final snapshot is on storage, names each
    trial's last checkpoint, and a finished study never restores the older ones."""
    import pyarrow.fs as pafs

    for result in grid:
        if result.checkpoint is None:
            continue
        last = result.checkpoint.path.rstrip("/")
        fs = result.filesystem
        for info in fs.get_file_info(pafs.FileSelector(result.path, allow_not_found=True)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_") \
                    and info.path.rstrip("/") != last:
                fs.delete_dir(info.path)


def _searcher(study: Study, plan: StudyPlan, ctx: TrialContext) -> tuple[Any, dict[str, Any], int]:
    """(searcher, param space, samples): a search's Optuna searcher, or the grid (every point
    crossed with every sample) for Tune to run once."""
    from ray import tune

    from .search import TrialSeededTPESampler, open_storage

    spec = study.spec
    if not plan.search_trials:
        return None, {"overrides": tune.grid_search(study.grid),
                      "sample": tune.grid_search(list(range(spec.samples)))}, 1
    # Several drivers may search one study at once (a shared storage): the storage survives a
    # concurrent schema creation, the study a concurrent create_study (OptunaSearch loads it),
    # and each trial is sampled with its own seed, from its storage-assigned number, so that
    # concurrent drivers propose different points while one driver's search repeats exactly.
    searcher = _PruningAwareOptunaSearch(space=optuna_space(spec.search), metric=spec.metric, mode=spec.mode,
                                         study_name=spec.name, storage=open_storage(plan.optuna_storage),
                                         sampler=TrialSeededTPESampler(study.trial_config(study.grid[0], 0).seed),
                                         tracking_uri=plan.mlflow_uri, parent_id=ctx.parent)
    return searcher, {}, plan.search_trials


def _tuner(study: Study, plan: StudyPlan, trainable, searcher, param_space: dict[str, Any], num_samples: int):
    """The Tuner: the interrupted experiment again on ``--resume``, else a new one (ASHA on the
    intermediate evaluations when pruning)."""
    from ray import tune

    if plan.resume and tune.Tuner.can_restore(plan.exp_path):
        return tune.Tuner.restore(plan.exp_path, trainable, resume_errored=True)
    spec, first = study.spec, study.trial_config(study.grid[0], 0)
    scheduler = tune.schedulers.ASHAScheduler(
        time_attr="distill.iteration", grace_period=first.eval.every,
        max_t=max(first.distill.iterations, first.eval.every), reduction_factor=2) if plan.prune else None
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=num_samples, max_concurrent_trials=spec.max_concurrent,
                                    reuse_actors=plan.reuse_actors),
        run_config=tune.RunConfig(name=plan.exp_name, storage_path=plan.results,
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                                  verbose=0 if plan.quiet else 1))


def _summarise(study: Study, plan: StudyPlan, ctx: TrialContext, grid, stages: dict[str, float]) -> dict[str, Any]:
    """Log the parent run's summary and report, close it, and return the study's summary."""
    spec = study.spec
    errors = [r for r in grid if r.error is not None]
    on_cpu = sum(1 for r in grid if (r.metrics or {}).get("ray.gpus") and not (r.metrics or {}).get("device.cuda"))
    if on_cpu:  # said once, by the driver, not once per trial
        log.warning("Ray assigned GPUs to %d trial(s) but torch saw no CUDA device there: they ran on the CPU", on_cpu)
    rows = [{"overrides": r.config.get("overrides", {k: v for k, v in r.config.items() if k != "sample"}),
             "sample": r.config.get("sample", 0), "metrics": r.metrics or {}, "error": r.error is not None}
            for r in grid]
    _summarise_parent(tracking, plan.mlflow_uri, ctx.parent, study, rows, plan.local_results, plan.exp_name)
    stages["summarised"] = time.time()
    _close(tracking, plan.mlflow_uri, ctx.parent, "FAILED" if errors else "FINISHED", plan.results, plan.exp_path)
    trials = [{"overrides": r["overrides"], "sample": r["sample"], spec.metric: r["metrics"].get(spec.metric),
               "acc.mean": r["metrics"].get("acc.mean"), "baseline.random.mean": r["metrics"].get("baseline.random.mean"),
               "pruned": not r["error"] and not r["metrics"].get("trial.final")} for r in rows]
    return {"parent_run_id": ctx.parent, "trials": trials, "errors": len(errors), "tracking_uri": plan.mlflow_uri,
            "results": plan.exp_path, "optuna_storage": plan.optuna_storage, "kind": plan.kind,
            "experiment_id": tracking.experiment_of(plan.mlflow_uri, ctx.parent),
            "timing": {**stages, "end": time.time()}}


def _open_parent(tracking, mlflow_uri: str, study: Study, swept: list[str], exp_path: str, resume: bool,
                 artifacts_uri: str | None, select_on_test: bool = False, kind: str = "study") -> str:
    """The study's MLflow parent run: the interrupted one again on ``--resume`` (its id is kept in
    the Tune experiment directory, local or in the bucket), else a new one."""
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
        **({"ptmdd.select_on_test": "true"} if select_on_test else {})}, artifacts_uri)
    write_json(record, {"run_id": parent, "tracking_uri": tracking.redact(mlflow_uri)})
    # the data set row exists before the trials link to it (the study's data, on its parent)
    import mlflow
    tracking.log_dataset(mlflow.MlflowClient(mlflow_uri), parent, study.trial_config(study.grid[0], 0))
    return parent


def _close(tracking, mlflow_uri: str, parent: str, status: str, results: str, exp_path: str) -> None:
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


def check_address(address: str | None) -> None:
    """An ``--address`` (or ``RAY_ADDRESS``) with no cluster behind it is a one-line ConfigError,
    found out in seconds (a TCP probe) rather than after Ray's minute of retries."""
    import socket

    address = address or os.environ.get("RAY_ADDRESS")
    host_port = (address or "").split("://", 1)[-1].rstrip("/")
    if not address or address == "auto" or ":" not in host_port:
        return
    host, port = host_port.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"address: no Ray cluster at {address} ({getattr(e, 'strerror', None) or e})") from None


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, set inside a ``ray job``), else start
    a local Ray on 127.0.0.1."""
    import ray

    from .service import init_local_ray, keep_to_loopback

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return init_local_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "::1"):
        keep_to_loopback()  # a cluster on this machine's loopback: the driver's node is 127.0.0.1 too
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"address: cannot join the Ray cluster at {address} ({str(e).splitlines()[0]})") from None


def _results_location(results: str, mlflow_uri: str | None) -> tuple[str, str | None]:
    """Where Tune keeps the experiment: an absolute local path, or a URI (``s3://bucket/prefix``,
    what a multi-node cluster needs: every node and the driver reach it). A URI cannot hold the
    default SQLite tracking file, so it needs ``--mlflow-uri``."""
    if "://" in results:
        if "?" in results:  # Tune and the parent record append paths to it: options would end mid-path
            raise ConfigError(f"results: {results.split('?')[0]}?...: URI options are not supported here; "
                              "set the endpoint and credentials with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...")
        if not mlflow_uri:
            raise ConfigError(f"results: {results} is not a local directory, so the default MLflow "
                              "SQLite file cannot live there: give --mlflow-uri (an MLflow server)")
        return results.rstrip("/"), None
    local = Path(results).expanduser().resolve()
    return str(local), str(local)


def _summarise_parent(tracking, mlflow_uri: str, parent: str, study: Study, rows: list[dict[str, Any]],
                      local_results: str | None, exp_name: str) -> None:
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
                write_report(mlflow_uri, spec.name, where, run=run)
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


def _search_experiment_name(study_name: str) -> str:
    """``<study>-search-<YYYYmmdd-HHMMSS>-<6 hex>``: the Tune experiment of one search invocation.
    Searches are not resumed (a second call continues the Optuna study instead), so concurrent or
    successive searches need not share a directory (and its experiment state, searcher checkpoint
    and ``mlflow_parent.json``), even with one ``--results``."""
    import secrets
    import time

    return f"{study_name}-search-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _PruningAwareOptunaSearch(tracking_uri: str | None = None, parent_id: str | None = None, **kwargs):
    """Ray's OptunaSearch, except that a trial stopped by the scheduler before its final
    evaluation is told to Optuna as PRUNED (Ray would record its last intermediate accuracy as the
    trial's value, a partial evaluation posing as a complete one), and its MLflow run (under
    ``parent_id``) is closed KILLED here if its worker could not: Tune ends a stopped trial's
    actor without waiting for the trial function, whose own KILLED may not get through in time
    (then the run would end FAILED, "stopped before it finished", at the end of the search)."""
    from ray.tune.search.optuna import OptunaSearch

    class Search(OptunaSearch):
        def on_trial_result(self, trial_id, result):
            if self.metric in result:  # progress reports (iteration, loss) carry no score to tell Optuna
                super().on_trial_result(trial_id, result)

        def suggest(self, trial_id):
            config = super().suggest(trial_id)
            if isinstance(config, dict):
                self.__dict__.setdefault("_ptmdd_configs", {})[trial_id] = config
            return config

        def on_trial_complete(self, trial_id, result=None, error=False):
            config = self.__dict__.get("_ptmdd_configs", {}).pop(trial_id, None)
            if result and not error and not result.get("trial.final"):
                result = {k: v for k, v in result.items() if k != self.metric}  # no value: PRUNED
                if tracking_uri and parent_id and config is not None:
                    tracking.end_stopped(tracking_uri, parent_id, trial_key(config), PRUNED_REASON)
            super().on_trial_complete(trial_id, result, error)

    return Search(**kwargs)


# ------------------------------------------------------------------ a trial


@dataclass(frozen=True)
class TrialContext:
    """What every trial takes from its driver, in one place: Tune hands it to :func:`trial`
    through the object store (``tune.with_parameters``) instead of a closure over the driver's locals."""

    study: Study
    store_uri: str  # the PTM store (its actor is named by it)
    mlflow_uri: str
    parent: str  # the MLflow parent run's id
    swept: tuple[str, ...]  # the keys the study varies, tagged on every run
    search: bool  # a search's trial (named by its Tune id) or a grid's (named by its sample)
    experiment_uri: str  # the Tune experiment (local or a URI), searched for this trial's checkpoints
    data_ref: Any = None  # the shared data set's arrays in the object store; None: each trial loads it


def trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One trial: taken over from an earlier attempt if that finished (or failed for good), else
    ``run_distill`` of its grid point with its MLflow run, reported to Tune as it goes and at the
    end with its phases (unix times, ``time.*``). Named ``trial``: Tune names its directories so."""
    from ray import tune

    from .service import RayRepository

    marks = {"enter": time.time()}  # the trial's phases (unix times), in its final report as time.*
    run = tracking.TrialRun(ctx.mlflow_uri, ctx.parent, trial_key(config))
    done, failed = run.claim()
    marks["claimed"] = time.time()
    if done is not None:  # finished before a driver crash: report it, do not run it again
        tune.report({**done, "trial.reused": 1.0, "trial.final": 1.0})
        return
    if failed is not None:  # it would fail the same way again
        raise TrialFailed(f"{failed} (an earlier attempt of this trial; not run again)")
    reset_peak_memory()
    sample, overrides = trial_point(config)
    cfg = replace(ctx.study.trial_config(overrides, sample), store=ctx.store_uri)
    repo = RayRepository(ctx.store_uri)
    reports = _Reports(cfg, ctx.study.spec.metric)
    _start_run(ctx, run, cfg, overrides, sample, repo, reports)
    marks["started"] = time.time()
    checkpoints = TuneCheckpoints(cfg.distill.checkpoint_every, trial_key(config), ctx.experiment_uri)
    result = _distill(ctx, run, cfg, repo, reports, checkpoints, marks)
    marks["process"] = process_start_time()
    tune.report({**tracking.metrics_of(result), **reports.memory, **reports.placement, "trial.final": 1.0,
                 "mlflow.logged": float(run.online), **{f"time.{k}": v for k, v in marks.items()},
                 "time.pool_s": result["pool_stats"]["seconds"],
                 "time.baseline_wait_s": result["timing"].get("baseline_wait_seconds", 0.0),
                 "time.guide_s": result["timing"].get("guide_seconds", 0.0),
                 "time.checkpoint_load_s": checkpoints.seconds["load"],
                 "time.checkpoint_save_s": checkpoints.seconds["save"]})


def trial_point(config: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(sample, overrides) of a Tune config: a grid's ``{overrides, sample}``, or a search's
    sampled values themselves."""
    overrides = config["overrides"] if "overrides" in config else {k: v for k, v in config.items() if k != "sample"}
    return config.get("sample", 0), overrides


def trial_key(config: dict[str, Any]) -> str:
    """A trial's identity across retries and resumes: a hash of its Tune config (grid point and
    sample, or sampled search values), not Tune's trial id, which a restored experiment may not
    keep for trials it had not checkpointed yet."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def progress_interval(cfg: Config) -> int:
    """Iterations between a trial's progress reports to Tune: about twenty per trial, no more
    often than it logs."""
    return max(cfg.distill.log_every, (cfg.distill.iterations or 0) // 20)


class _Reports:
    """A trial's reports to Tune while it distils (progress, and its evaluations along the way
    when they are on the study metric's split), its memory sampled meanwhile, and where it runs."""

    def __init__(self, cfg: Config, metric: str):
        self.every, self.metric = progress_interval(cfg), metric
        self.scores = metric_split(metric) == eval_split(cfg)
        self.memory: dict[str, float] = {}
        self.placement: dict[str, float] = {}

    def on_log(self, it: int, loss: float) -> None:  # sample memory while the data set is held
        from ray import tune

        for k, v in memory_mb().items():
            self.memory[k] = max(v, self.memory.get(k, 0.0))
        if it > 0 and it % self.every == 0:  # Tune's table moves; schedulers and Optuna wait for scores
            tune.report({"distill.iteration": it, "distill.loss": loss, "trial.final": 0.0})

    def on_eval(self, it: int, acc: float) -> None:
        from ray import tune

        tune.report({self.metric: acc, "distill.iteration": it, "trial.final": 0.0})


def _distill(ctx: TrialContext, run, cfg: Config, repo, reports: _Reports, checkpoints: TuneCheckpoints,
             marks: dict[str, float]) -> dict[str, Any]:
    """``run_distill`` in the trial's directory, and its run finished; or ended KILLED (pruned) or
    FAILED (with why, and whether a retry would fail alike)."""
    import ray
    from ray import tune

    from .data import ImageData
    from .methods import DivergenceError
    from .pipeline import run_distill

    out = Path(trial_dir(tune.get_context())) / "out"
    try:
        data = ImageData.from_arrays(ray.get(ctx.data_ref)) if ctx.data_ref is not None else None
        reports.memory.update(object_store_mb())
        marks["data"] = time.time()
        result = run_distill(cfg, out, progress=False, on_log=reports.on_log, repo=repo, data=data,
                             on_eval=reports.on_eval if reports.scores else None, checkpoints=checkpoints)
        marks["distilled"] = time.time()
        reports.on_log(-1, 0.0)
        run.finish(result, out, reports.memory)
        marks["logged"] = time.time()
    except SystemExit:  # how Tune ends a trial its scheduler stopped (pruning)
        run.end("KILLED", {"ptmdd.stopped": PRUNED_REASON})
        raise
    except BaseException as e:
        run.end("FAILED", {"ptmdd.failure": f"{type(e).__name__}: {e}"[:1000],
                           **({"ptmdd.deterministic": "true"} if isinstance(e, (DivergenceError, ConfigError))
                              else {})})
        raise
    return result


def _start_run(ctx: TrialContext, run, cfg: Config, overrides: dict[str, Any], sample: int, repo,
               reports: _Reports) -> None:
    """Open the trial's MLflow run, named and tagged with its point and where it runs (which
    also goes into its final Tune report)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    where = placement_tags(repo)
    reports.placement = {"ray.gpus": float(len([g for g in where["ray.gpu_ids"].split(",") if g])),
                         "device.cuda": float(where["ptmdd.device"] == "cuda")}
    name = run_name(overrides, f"#{sample}" if not ctx.search else f"({trial_id[-5:]})")
    run.start(cfg, {"ptmdd.study": ctx.study.spec.name, "ptmdd.trial_id": trial_id, "ptmdd.swept": ",".join(ctx.swept),
                    "ptmdd.run_name": name, "ptmdd.sample": str(sample),
                    "ptmdd.point": json.dumps(overrides, sort_keys=True, default=str), **where})


def trial_dir(ctx) -> str:
    """The running trial's directory, the one Tune copies into the experiment (``results``). A trial
    in a fresh worker gets it from its context; a trial in a reused worker (``reuse_actors``) would
    get the worker's working directory there (Ray 2.x's ``reset_config``), which is never copied, so
    it is read from the trial's storage context, as the fresh worker's is."""
    from ray.train._internal.session import get_session

    try:
        return get_session().storage.trial_driver_staging_path
    except (AttributeError, RuntimeError):  # no storage context: what the context says
        return ctx.get_trial_dir()


def object_store_mb() -> dict[str, float]:
    """``objstore.node_mb``: the object-store bytes of this trial's node while it holds the data."""
    from .service import object_store_bytes

    used = object_store_bytes()
    return {} if used is None else {"objstore.node_mb": used / 2**20}


def placement_tags(repo) -> dict[str, str]:
    """Where a trial runs, as MLflow tags: its Ray node, the GPU ids Ray assigned it (torch may
    still run on the CPU: see :func:`~ptmdd_ray.service.note_device`), the store actor's node."""
    import ray

    from .service import note_device

    gpus = tuple(str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
    return {"ray.node_id": ray.get_runtime_context().get_node_id(), "ray.gpu_ids": ",".join(gpus),
            "ptmdd.device": note_device(gpus), "ptmdd.store_node": ray.get(repo.actor.node_id.remote())}


class TuneCheckpoints:
    """A trial's distillation state kept as Tune checkpoints (see
    :class:`ptmdd_ray.pipeline.Checkpoints`): a retried attempt (its worker died) or a resumed study
    (its driver died) goes on from the last one instead of iteration 0. One safetensors file named
    by the trial's key: tensors plus JSON, nothing pickled.

    Tune hands a retried attempt its last checkpoint, but a driver killed between a trial's
    checkpoint and Tune's next snapshot of the experiment forgets it (a trial created after that
    snapshot even comes back in a new directory); so the experiment's storage (``experiment_uri``,
    local or ``pyarrow.fs``) is searched for this trial's states too, and the latest one wins."""

    def __init__(self, every: int, key: str, experiment_uri: str | None = None):
        self.every, self.key, self.experiment_uri = every, key, experiment_uri
        self.file = f"distill_state-{key}.safetensors"
        self.seconds = {"load": 0.0, "save": 0.0}  # spent looking for states and saving them

    def load(self):
        t0 = time.perf_counter()
        try:
            return self._load()
        finally:
            self.seconds["load"] += time.perf_counter() - t0

    def _load(self):
        from ray import tune

        from .methods import DistillState

        ckpt = tune.get_checkpoint()
        given = f"{ckpt.path}/{self.file}" if ckpt is not None else None
        found = [self._read(given, ckpt.filesystem)] if ckpt is not None else []
        found = [f for f in found + self._stored(skip=given) if f is not None]
        if not found:
            return None
        tensors, meta = max(found, key=lambda f: f[1]["state"]["iteration"])
        return DistillState.from_parts(tensors, meta["state"]), meta["extra"]

    def save(self, state, extra: dict[str, Any]) -> None:
        import tempfile

        from ray import tune

        from .artifacts import write_tensors

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            write_tensors(Path(d, self.file), state.tensors(), {"state": state.meta(), "extra": extra, "key": self.key})
            tune.report({"distill.iteration": state.iteration, "distill.checkpoint": state.iteration,
                         "trial.final": 0.0}, checkpoint=tune.Checkpoint.from_directory(d))
        self.seconds["save"] += time.perf_counter() - t0

    def _stored(self, skip: str | None = None) -> list:
        """This trial's states anywhere under the experiment (``<trial dir>/checkpoint_*/``) but
        ``skip``, the one Tune handed back (already read; usually among them)."""
        import pyarrow.fs as pafs

        if not self.experiment_uri:
            return []
        fs, where = pafs.FileSystem.from_uri(self.experiment_uri) if "://" in self.experiment_uri else (
            pafs.LocalFileSystem(), str(Path(self.experiment_uri).resolve()))
        try:
            infos = fs.get_file_info(pafs.FileSelector(where, allow_not_found=True, recursive=True))
        except OSError:
            return []
        local = isinstance(fs, pafs.LocalFileSystem)
        norm = os.path.realpath if local else os.path.normpath
        skipped = norm(skip) if skip else None
        return [self._read(i.path, fs) for i in infos if i.base_name == self.file and norm(i.path) != skipped]

    def _read(self, path: str, fs):
        """(tensors, meta) of a saved state, or None if it is not whole or not this trial's."""
        import tempfile

        import pyarrow.fs as pafs

        from .artifacts import read_tensors

        try:
            with tempfile.TemporaryDirectory() as d:
                pafs.copy_files(path, str(Path(d, self.file)), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
                tensors, meta = read_tensors(Path(d, self.file))
        except Exception as e:  # noqa: BLE001 - a checkpoint cut off mid-write is no checkpoint
            log.info("ignoring an unreadable distillation checkpoint %s: %s", path, e)
            return None
        return (tensors, meta) if meta.get("key") == self.key else None
