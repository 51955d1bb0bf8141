"""The driver: :func:`run_study` in its five named steps (plan, load and check the data, set up,
fit, summarise), and what each of them does."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

from .. import tracking
from ..study_spec import Study
from .cluster import connect_ray
from .costs import ptm_users
from .parent import close_parent, open_parent, summarise_parent
from .plan import StudyPlan, make_plan
from .searcher import searcher_for
from .trial import TrialContext, trial

log = logging.getLogger(__name__)


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
    plan = make_plan(study, address, mlflow_uri, store, results, resume, search_trials, optuna_storage, share_data,
                     prune, select_on_test, quiet, reuse_actors)
    data = _load_checked_data(study, plan)
    stages["checked"] = time.time()
    ctx = _set_up(study, plan, data, stages)
    del data  # the driver keeps no copy: trials map the shared one, or load their own
    grid = _fit(study, plan, ctx, stages)
    return _summarise(study, plan, ctx, grid, stages)


def _load_checked_data(study: Study, plan: StudyPlan):
    """The data, once: a split or an IPC that does not fit is one line here, not a failed trial
    each; and a store that could not take checkpoints, found out before any training."""
    from ..data import load_data
    from ..pipeline import check_ipc
    from ..store import CheckpointStore

    first = study.trial_config(study.grid[0], 0)
    data = load_data(first.dataset, first.seed)
    check_ipc(data, max(study.trial_config(p, 0).distill.ipc for p in study.grid))
    CheckpointStore(plan.store_uri).check_writable()
    return data


def _set_up(study: Study, plan: StudyPlan, data, stages: dict[str, float]) -> TrialContext:
    """Join Ray, start the store actor, open the MLflow parent run and share the data: what every
    trial needs, as the context Tune hands it."""
    import ray

    from ..service import get_store_actor

    connect_ray(plan.address)
    stages["ray"] = time.time()
    # the store actor (a worker process of its own) starts while the driver opens MLflow and Tune
    # sets up, rather than while the first trials wait for it
    get_store_actor(plan.store_uri)
    if plan.local_results:
        Path(plan.local_results).mkdir(parents=True, exist_ok=True)
    tracking.limit_http_retries()
    swept = _swept(study, plan)
    parent = open_parent(tracking, plan.mlflow_uri, study, swept, plan.exp_path, plan.resume, plan.artifacts_uri,
                         plan.on_test, plan.kind, plan.optuna_storage)
    shared = _shares_data(study, plan, swept)
    stages["parent"] = time.time()
    return TrialContext(study=study, store_uri=plan.store_uri, mlflow_uri=plan.mlflow_uri, parent=parent,
                        swept=tuple(swept), search=bool(plan.search_trials), experiment_uri=plan.exp_path,
                        data_ref=ray.put(data.to_arrays()) if shared else None,
                        ptm_users=ptm_users(study, plan.search_trials))


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
    searcher, param_space, num_samples = searcher_for(study, plan, ctx)
    try:
        tuner = _tuner(study, plan, trainable, searcher, param_space, num_samples)
        with contextlib.redirect_stdout(io.StringIO()) if plan.quiet else contextlib.nullcontext():
            stages["fit"] = time.time()
            grid = _fit_through_memory_kills(tuner, plan, trainable, study.spec.max_failures)
            stages["fitted"] = time.time()
    except BaseException:
        close_parent(tracking, plan.mlflow_uri, ctx.parent, "FAILED", plan.results, plan.exp_path)
        raise
    _keep_last_checkpoints(grid)
    return grid


def _fit_through_memory_kills(tuner, plan: StudyPlan, trainable, restores: int):
    """``tuner.fit()``, restored from its own saved state when Ray's memory monitor killed trial
    workers (at most ``restores`` times, the study's ``max_failures``).

    A trial whose worker is SIGKILLed is retried by Tune itself, but a worker that Ray's memory
    monitor kills reaches Tune's actor manager as an unexpected exception (``OutOfMemoryError``,
    not an actor error), and ``fit`` raises: the whole study would end because the node was short
    of memory for a moment (seen when a load test shared the machine with a study). Tune's state
    and the trials' checkpoints are saved, so the driver does here what ``--resume`` would do: the
    finished trials are reported, the killed ones go on from their last checkpoints."""
    from ray import tune

    for attempt in range(restores + 1):
        try:
            return tuner.fit()  # Tune prints its tables whatever its verbosity: quiet keeps them from stdout
        except RuntimeError as e:
            if attempt == restores or not _killed_for_memory(e) or not tune.Tuner.can_restore(plan.exp_path):
                raise
            log.warning("Ray's memory monitor killed trial workers (%s); restoring the study from %s (%d/%d)",
                        str(e.__cause__ or e).split(".")[0], plan.exp_path, attempt + 1, restores)
            tuner = tune.Tuner.restore(plan.exp_path, trainable, resume_errored=True)


def _killed_for_memory(error: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is Ray's memory monitor killing workers."""
    from ray.exceptions import OutOfMemoryError

    while error is not None:
        if isinstance(error, OutOfMemoryError):
            return True
        error = error.__cause__ or error.__context__
    return False


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
    summarise_parent(tracking, plan.mlflow_uri, ctx.parent, study, rows, plan.local_results, plan.exp_name,
                     plan.optuna_storage)
    stages["summarised"] = time.time()
    close_parent(tracking, plan.mlflow_uri, ctx.parent, "FAILED" if errors else "FINISHED", plan.results, plan.exp_path)
    trials = [{"overrides": r["overrides"], "sample": r["sample"], spec.metric: r["metrics"].get(spec.metric),
               "acc.mean": r["metrics"].get("acc.mean"), "baseline.random.mean": r["metrics"].get("baseline.random.mean"),
               "pruned": not r["error"] and not r["metrics"].get("trial.final")} for r in rows]
    return {"parent_run_id": ctx.parent, "trials": trials, "errors": len(errors), "tracking_uri": plan.mlflow_uri,
            "results": plan.exp_path, "optuna_storage": plan.optuna_storage, "kind": plan.kind,
            "experiment_id": tracking.experiment_of(plan.mlflow_uri, ctx.parent),
            "timing": {**stages, "end": time.time()}}

