"""A trial: one grid point and sample (or one sampled search point), a full ``run_distill`` with
its MLflow run, reported to Tune as it goes. :func:`trial` is a module-level function that Tune
hands a :class:`TrialContext` (``tune.with_parameters``) rather than a closure over the driver's
locals; its identity across retries and resumes is :func:`trial_key`."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import tracking
from ..config import Config, eval_split
from ..errors import ConfigError, DivergenceError, MemoryShortError
from ..proc import memory_mb, process_start_time, release_freed_memory, reset_peak_memory
from ..study_spec import Study, metric_split, run_name
from .checkpoints import TuneCheckpoints

log = logging.getLogger(__name__)

PRUNED_REASON = "pruned by the scheduler on its intermediate evaluations"


class TrialFailed(RuntimeError):
    """A trial that failed deterministically in an earlier attempt (its reason repeated)."""


def fails_for_good(e: BaseException) -> bool:
    """Whether a trial's error would come back on a retry: bad input (:class:`ConfigError`) and a
    diverging distillation (:class:`DivergenceError`) would, so its run records that and a resumed
    study does not run it again. Anything else is retried: a killed worker, or memory short only for
    the moment (``MemoryShortError``, which a neighbouring trial's peak can cause)."""
    return isinstance(e, (ConfigError, DivergenceError))


def waiting_for_memory(run: Callable[[], Any], patience_s: float = 600.0, poll_s: float = 15.0) -> Any:
    """``run()``, run again every ``poll_s`` seconds while it meets memory that is short for the moment
    (a neighbouring trial at its peak), for ``patience_s`` at most: the check comes before any work, so
    a retry costs nothing, and waiting here beats spending Tune's retries within seconds."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return run()
        except MemoryShortError as e:
            if time.monotonic() + poll_s > deadline:
                raise
            log.warning("%s: trying again in %.0f s", e, poll_s)
            time.sleep(poll_s)


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
    ptm_users: Mapping[str, int] = field(default_factory=dict)  # trials per PTM key (study.costs.ptm_users)


def trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One trial: taken over from an earlier attempt if that finished (or failed for good), else
    ``run_distill`` of its grid point with its MLflow run, reported to Tune as it goes and at the
    end with its phases (unix times, ``time.*``). Named ``trial``: Tune names its directories so."""
    from ray import tune

    from ..service import RayRepository

    marks = {"enter": time.time()}  # the trial's phases (unix times), in its final report as time.*
    run = tracking.TrialRun(ctx.mlflow_uri, ctx.parent, trial_key(config))
    done, failed = run.claim()
    marks["claimed"] = time.time()
    if done is not None:  # finished before a driver crash: report it, do not run it again
        tune.report({**done, "trial.reused": 1.0, "trial.final": 1.0})
        return
    if failed is not None:  # it would fail the same way again
        raise TrialFailed(f"{failed} (an earlier attempt of this trial; not run again)")
    release_freed_memory()  # what an earlier trial of this reused worker freed: not this trial's peak
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

    from ..data import ImageData
    from ..pipeline import run_distill

    out = Path(trial_dir(tune.get_context())) / "out"
    try:
        data = ImageData.from_arrays(ray.get(ctx.data_ref)) if ctx.data_ref is not None else None
        reports.memory.update(object_store_mb())
        marks["data"] = time.time()
        result = waiting_for_memory(lambda: run_distill(
            cfg, out, progress=False, on_log=reports.on_log, repo=repo, data=data,
            on_eval=reports.on_eval if reports.scores else None, checkpoints=checkpoints, ptm_users=ctx.ptm_users))
        marks["distilled"] = time.time()
        reports.on_log(-1, 0.0)
        run.finish(result, out, reports.memory)
        marks["logged"] = time.time()
    except SystemExit:  # how Tune ends a trial its scheduler stopped (pruning)
        run.end("KILLED", {"ptmdd.stopped": PRUNED_REASON})
        raise
    except BaseException as e:
        run.end("FAILED", {"ptmdd.failure": f"{type(e).__name__}: {e}"[:1000],
                           **({"ptmdd.deterministic": "true"} if fails_for_good(e) else {})})
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
    from ..service import object_store_bytes

    used = object_store_bytes()
    return {} if used is None else {"objstore.node_mb": used / 2**20}


def placement_tags(repo) -> dict[str, str]:
    """Where a trial runs, as MLflow tags: its Ray node, the GPU ids Ray assigned it (torch may
    still run on the CPU: see :func:`~ptmdd_ray.service.note_device`), the store actor's node."""
    import ray

    from ..service import note_device

    gpus = tuple(str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
    return {"ray.node_id": ray.get_runtime_context().get_node_id(), "ray.gpu_ids": ",".join(gpus),
            "ptmdd.device": note_device(gpus), "ptmdd.store_node": ray.get(repo.actor.node_id.remote())}

