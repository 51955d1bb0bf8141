"""Where and how one call of :func:`~ptmdd_ray.study.run_study` runs: its options resolved and
checked (the metric, the results location, MLflow, the Optuna storage, the Ray address) before
anything is started or written."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import tracking
from ..config import ConfigError
from ..study_spec import Study, check_selection, metric_split, objectives
from .cluster import check_address


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


def make_plan(study: Study, address: str | None, mlflow_uri: str | None, store: str | None, results: str, resume: bool,
              search_trials: int, optuna_storage: str | None, share_data: bool, prune: bool, select_on_test: bool,
              quiet: bool, reuse_actors: bool) -> StudyPlan:
    """The call's options resolved, and everything about them that can be checked checked (the
    metric, the results location, MLflow, the Optuna storage, the Ray address): nothing started
    or written yet."""
    spec = study.spec
    check_selection(study, bool(search_trials), prune, select_on_test)
    results, local_results = results_location(results, mlflow_uri)
    if mlflow_uri:
        tracking.check_reachable(mlflow_uri)
    if search_trials and optuna_storage:
        tracking.check_database(optuna_storage, "optuna-storage")
    if search_trials and not optuna_storage and local_results is None:
        raise ConfigError(f"optuna-storage: --results {results} is not a local directory, so the default "
                          "Optuna SQLite file cannot live there: give --optuna-storage (e.g. postgresql://...)")
    check_address(address)
    storage = (optuna_storage or f"sqlite:///{Path(local_results or '.') / 'optuna.db'}") if search_trials else None
    if storage:
        from ..search import check_directions

        check_directions(storage, spec.name, ["maximize" if m == "max" else "minimize" for _, m in objectives(spec)])
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
        exp_name=search_experiment_name(spec.name) if search_trials else spec.name,
        optuna_storage=storage,
        search_trials=search_trials, resume=resume, share_data=share_data, prune=prune,
        # any test metric chooses on test (a search's best trial, or the best point the parent
        # run names): said in MLflow and the report, never silently
        on_test=metric_split(spec.metric) == "test",
        quiet=quiet, reuse_actors=reuse_actors)


def results_location(results: str, mlflow_uri: str | None) -> tuple[str, str | None]:
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


def search_experiment_name(study_name: str) -> str:
    """``<study>-search-<YYYYmmdd-HHMMSS>-<6 hex>``: the Tune experiment of one search invocation.
    Searches are not resumed (a second call continues the Optuna study instead), so concurrent or
    successive searches need not share a directory (and its experiment state, searcher checkpoint
    and ``mlflow_parent.json``), even with one ``--results``."""
    import secrets
    import time

    return f"{study_name}-search-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"

