"""Studies: Ray Tune sweeps over dotted config keys, every trial a full ``run_distill``.

A study file wraps a core config (``base``) with a ``sweep`` (grid/choice per dotted key) and
optional ``cases`` (override sets that go together, e.g. a PTM source with the loss that suits its
label space), crossed with each other, repeats
(``samples``, each with its own seed), per-trial ``resources`` and ``max_concurrent``. Every grid
point is validated before anything runs. Trials share the PTM store through its Ray actor (so a PTM
is trained once per study, not once per trial) and report to MLflow as nested runs of one parent.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any

from .artifacts import read_json, write_json
from .config import (ConfigError, anchor_paths, build_config, flatten, from_dict, load_yaml, parse_override,
                     set_dotted, to_dict)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass(frozen=True)
class Claim:
    """A finding the study tests: trials matching ``better`` (a subset of a grid point's
    overrides) beat those matching ``than`` (overrides, ``control`` or ``random`` for the
    random-real baseline), paired by sample. ``ptmdd report`` gives the verdict."""

    claim: str = ""
    better: dict[str, Any] = field(default_factory=dict)
    than: dict[str, Any] | str = "control"


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    base: dict[str, Any] | str = field(default_factory=dict)
    sweep: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    cases: list[dict[str, Any]] = field(default_factory=list)  # paired overrides, crossed with the grid
    search: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    metric: str = "acc.mean"
    mode: str = "max"
    samples: int = 1
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int = 2
    max_failures: int = 2
    matrix: str | None = None  # a swept key: `ptmdd report` draws it against the other swept keys
    control: dict[str, Any] | None = None  # the plain method, run once per sample beside the grid
    claims: list[Claim] = field(default_factory=list)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class Study:
    spec: StudyConfig
    base: dict[str, Any]  # the core config mapping (validated)
    grid: list[dict[str, Any]]  # one dict of dotted overrides per grid point
    control_added: bool = False  # the control is the last grid point, not one of the sweep's own
    cwd: str = field(default_factory=os.getcwd)  # where relative paths point (trials run elsewhere)

    def trial_config(self, overrides: dict[str, Any], sample: int):
        data = copy.deepcopy(self.base)
        for k, v in copy.deepcopy(overrides).items():  # anchor_paths edits in place: not the grid's own
            set_dotted(data, k, v)
        data["seed"] = int(data.get("seed", 0)) + sample
        return build_config(anchor_paths(data, self.cwd))


def load_study(path: str | Path, overrides: list[str] = ()) -> Study:
    """Parse and validate a study file; every grid point must give a valid core config."""
    path = Path(path)
    data = load_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    spec = from_dict(StudyConfig, data)
    base = spec.base
    if isinstance(base, str):
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        base = load_yaml(base_path)
    base_cfg = build_config(copy.deepcopy(base))
    known = set(flatten(base_cfg))
    _check(spec.samples >= 1, "samples", f"must be >= 1, got {spec.samples}")
    _check(spec.max_concurrent >= 1, "max_concurrent", f"must be >= 1, got {spec.max_concurrent}")
    _check(spec.max_failures >= 0, "max_failures", f"must be >= 0, got {spec.max_failures}")
    _check(spec.mode in ("max", "min"), "mode", f"expected max or min, got {spec.mode!r}")
    _check(spec.resources.cpu > 0 and spec.resources.gpu >= 0, "resources", "cpu must be > 0 and gpu >= 0")
    axes = {}
    for key, dist in spec.sweep.items():
        _check(key in known, f"sweep.{key}", "not a config key (`ptmdd config` lists them)")
        _check(len(dist) == 1 and next(iter(dist)) in ("grid", "choice"), f"sweep.{key}",
               "expected {grid: [...]} or {choice: [...]}")
        values = next(iter(dist.values()))
        _check(isinstance(values, list) and len(values) >= 1, f"sweep.{key}", "needs a non-empty list")
        axes[key] = values
    for i, case in enumerate(spec.cases):
        for key in case:
            _check(key in known, f"cases[{i}].{key}", "not a config key")
    grid = [dict(zip(axes, combo)) for combo in product(*axes.values())] if axes else [{}]
    grid = [{**case, **point} for case in (spec.cases or [{}]) for point in grid]
    if spec.control is not None:
        for key in spec.control:
            _check(key in known, f"control.{key}", "not a config key")
        added = spec.control not in grid
        if added:
            grid.append(dict(spec.control))
    study = Study(spec, base, grid, control_added=spec.control is not None and added)
    for point in grid:
        try:
            cfg = study.trial_config(point, 0)
        except ConfigError as e:
            raise ConfigError(f"sweep point {point}: {e}") from None
        _check(metric_split(spec.metric) == "test" or cfg.dataset.val_per_class > 0, "metric",
               f"{spec.metric} is a validation metric but dataset.val_per_class is 0 at {point or 'the base'} "
               "(no validation split)")
    varied = set(axes) | {k for case in spec.cases for k in case}
    _check(spec.matrix is None or spec.matrix in varied, "matrix", f"{spec.matrix!r} is not a swept key")
    for i, c in enumerate(spec.claims):
        _check(bool(c.claim), f"claims[{i}].claim", "needs the finding in words")
        for side in ("better", "than"):
            sel = getattr(c, side)
            if isinstance(sel, str):
                _check(side == "than" and sel in ("control", "random"), f"claims[{i}].{side}",
                       "expected overrides, control or random")
                _check(sel != "control" or spec.control is not None, f"claims[{i}].than", "the study has no control")
            else:
                free = [k for k, v in sel.items() if v == BEST]
                _check(not free or metric_split(spec.metric) == "val", f"claims[{i}].{side}",
                       f"'{BEST}' is chosen on the study's metric, and {spec.metric} is not a validation metric")
                for k in free:
                    _check(k in varied, f"claims[{i}].{side}.{k}", f"'{BEST}' needs a swept key, and {k} is not swept")
                fixed = {k: v for k, v in sel.items() if v != BEST}
                _check(any(matches(p, fixed) for p in grid), f"claims[{i}].{side}", f"{sel} matches no grid point")
    for key, dist in spec.search.items():
        _check(key in known, f"search.{key}", "not a config key")
        _check(len(dist) == 1 and next(iter(dist)) in SEARCH_KINDS, f"search.{key}",
               f"expected one of {{{', '.join(SEARCH_KINDS)}: ...}}")
        kind, values = next(iter(dist.items()))
        if kind == "choice":
            _check(isinstance(values, list) and len(values) >= 1, f"search.{key}", "choice needs a non-empty list")
            ends = values
        else:
            _check(isinstance(values, list) and len(values) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), f"search.{key}",
                f"{kind} needs [low, high]")
            _check(values[0] <= values[1], f"search.{key}", f"low {values[0]} > high {values[1]}")
            _check(kind != "loguniform" or values[0] > 0, f"search.{key}", "loguniform needs low > 0")
            ends = values
        for v in ends:  # the ends of every range must give valid configs
            try:
                study.trial_config({key: v}, 0)
            except ConfigError as e:
                raise ConfigError(f"search.{key}: {v!r} gives an invalid config ({e})") from None
    return study


BEST = "best"  # a claim's selector value: the swept value chosen on the study's (validation) metric


def metric_split(metric: str) -> str:
    """``val`` for the metrics scored on the validation split (``val.acc.mean``), else ``test``."""
    return "val" if metric.startswith("val.") else "test"


def check_selection(study: Study, search: bool, prune: bool, select_on_test: bool) -> None:
    """Choices are made on validation: a search (which picks its best trial by the metric) or a
    scheduler (which prunes on it) refuses a test metric unless the user says ``--select-on-test``;
    and a scheduler needs its intermediate evaluations on the metric's split."""
    spec = study.spec
    first = study.trial_config(study.grid[0], 0)
    if prune and not (search and first.eval.every > 0):
        raise ConfigError("prune: needs `ptmdd search` and base.eval.every > 0 (the evaluations to prune on)")
    split = metric_split(spec.metric)
    if search and split == "test" and not select_on_test:
        raise ConfigError(f"metric: {spec.metric} is test accuracy and a search chooses by it; choose on "
                          "val.acc.mean (with dataset.val_per_class > 0), or pass --select-on-test")
    along = "val" if first.dataset.val_per_class > 0 else "test"
    if prune and along != split:
        raise ConfigError(f"prune: the intermediate evaluations are on the {along} split but metric {spec.metric} "
                          f"is on {split}")


def matches(point: dict[str, Any], selector: dict[str, Any]) -> bool:
    """Whether a grid point has every override of ``selector`` (numbers compared as numbers)."""
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return float(a) == float(b)
        return a == b

    return all(k in point and same(point[k], v) for k, v in selector.items())


SEARCH_KINDS = ("uniform", "loguniform", "int", "choice")


def optuna_space(search: dict[str, dict[str, list[Any]]]) -> dict:
    """The ``search`` section as Optuna distributions."""
    import optuna

    space = {}
    for key, dist in search.items():
        kind, v = next(iter(dist.items()))
        if kind == "choice":
            space[key] = optuna.distributions.CategoricalDistribution(v)
        elif kind == "int":
            space[key] = optuna.distributions.IntDistribution(int(v[0]), int(v[1]))
        else:
            space[key] = optuna.distributions.FloatDistribution(float(v[0]), float(v[1]), log=kind == "loguniform")
    return space


class TrialFailed(RuntimeError):
    """A trial that failed deterministically in an earlier attempt (its reason repeated)."""


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
                    from . import tracking

                    tracking.end_stopped(tracking_uri, parent_id, trial_key(config), PRUNED_REASON)
            super().on_trial_complete(trial_id, result, error)

    return Search(**kwargs)


PRUNED_REASON = "pruned by the scheduler on its intermediate evaluations"


def _search_experiment_name(study_name: str) -> str:
    """``<study>-search-<YYYYmmdd-HHMMSS>-<6 hex>``: the Tune experiment of one search invocation.
    Searches are not resumed (a second call continues the Optuna study instead), so concurrent or
    successive searches need not share a directory (and its experiment state, searcher checkpoint
    and ``mlflow_parent.json``), even with one ``--results``."""
    import secrets
    import time

    return f"{study_name}-search-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "+".join(_short(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={_short(v)}" for k, v in sorted(value.items()))
    return str(value)


def run_name(point: dict[str, Any], tag: str) -> str:
    """A child run's name in the MLflow UI: its grid point with each key by its last dotted part
    (the full key where two would read alike) and ``tag`` (the sample ``#0``, or a search trial's
    id), e.g. ``clom=30 cclom=0 #1``. Unique within a study: grid points differ, and so do tags."""
    last = [k.rsplit(".", 1)[-1] for k in point]
    keys = [short if last.count(short) == 1 else k for k, short in zip(point, last)]
    body = " ".join(f"{k}={_short(v)}" for k, v in zip(keys, point.values())) or "base"
    return f"{body} {tag}"


def summary_metrics(spec: StudyConfig, rows: list[dict[str, Any]]) -> dict[str, float]:
    """The parent run's metrics: the best finished trial by the study's metric (its metric and its
    test accuracy), the plain method's and the random-real baseline's mean test accuracy, and the
    counts of finished, pruned and failed trials. ``rows``: {overrides, metrics, error}."""
    import statistics

    done = [r for r in rows if not r["error"] and (r["metrics"] or {}).get("trial.final")]
    out = {"trials.finished": float(len(done)), "trials.failed": float(sum(bool(r["error"]) for r in rows)),
           "trials.pruned": float(len(rows) - len(done) - sum(bool(r["error"]) for r in rows))}
    scored = [r for r in done if spec.metric in r["metrics"]]
    if scored:
        pick = (max if spec.mode == "max" else min)(scored, key=lambda r: r["metrics"][spec.metric])
        out[f"best.{spec.metric}"] = pick["metrics"][spec.metric]
        if "acc.mean" in pick["metrics"]:
            out["best.acc.mean"] = pick["metrics"]["acc.mean"]
    for name, members in (("control.acc.mean", [r for r in done if spec.control is not None
                                                and r["overrides"] == spec.control]),
                          ("baseline.random.mean", done)):
        key = "baseline.random.mean" if name.startswith("baseline") else "acc.mean"
        values = [r["metrics"][key] for r in members if key in r["metrics"]]
        if values:
            out[name] = statistics.fmean(values)
    return out


def trial_key(config: dict[str, Any]) -> str:
    """A trial's identity across retries and resumes: a hash of its Tune config (grid point and
    sample, or sampled search values), not Tune's trial id, which a restored experiment may not
    keep for trials it had not checkpointed yet."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reset_peak_memory() -> None:
    """Start this process's peak resident set (``VmHWM``) afresh: a trial's worker process may have
    run earlier trials of the study (Tune reuses it), whose peaks are not this trial's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def memory_mb() -> dict[str, float]:
    """This process's peak resident set (since :func:`reset_peak_memory`) and current private
    memory (MiB), from /proc (Linux).
    Pages mapped from the object store are shared, so ``mem.private_mb`` (a trial keeps its largest
    value seen during distillation) shows what a trial holds of its own."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["mem.peak_rss_mb"] = int(line.split()[1]) / 1024
        private = 0
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1])
        out["mem.private_mb"] = private / 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


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


def process_start_time() -> float:
    """When this process started (unix time, to ~10 ms; nan off Linux): a trial's worker start-up
    is the time from it to the trial function's first line."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


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
        found = [self._read(f"{ckpt.path}/{self.file}", ckpt.filesystem)] if ckpt is not None else []
        found = [f for f in found + self._stored() if f is not None]
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

    def _stored(self) -> list:
        """This trial's states anywhere under the experiment (``<trial dir>/checkpoint_*/``)."""
        import pyarrow.fs as pafs

        if not self.experiment_uri:
            return []
        fs, where = pafs.FileSystem.from_uri(self.experiment_uri) if "://" in self.experiment_uri else (
            pafs.LocalFileSystem(), str(Path(self.experiment_uri).resolve()))
        try:
            infos = fs.get_file_info(pafs.FileSelector(where, allow_not_found=True, recursive=True))
        except OSError:
            return []
        return [self._read(i.path, fs) for i in infos if i.base_name == self.file]

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
    import ray
    from ray import tune

    from . import tracking
    from .data import ImageData, load_data
    from .methods import DivergenceError
    from .pipeline import check_ipc, run_distill
    from .service import RayRepository, get_store_actor
    from .store import CheckpointStore

    stages = {"start": time.time()}  # the driver's phases (unix times): the summary's "timing"
    spec = study.spec
    first = study.trial_config(study.grid[0], 0)
    check_selection(study, bool(search_trials), prune, select_on_test)
    on_test = select_on_test and metric_split(spec.metric) == "test" and bool(search_trials or prune)
    # Everything that can be checked is checked before anything is started or written.
    results, local_results = _results_location(results, mlflow_uri)
    if mlflow_uri:
        tracking.check_reachable(mlflow_uri)
    if search_trials and optuna_storage:
        tracking.check_database(optuna_storage, "optuna-storage")
    if search_trials and not optuna_storage and local_results is None:
        raise ConfigError(f"optuna-storage: --results {results} is not a local directory, so the default "
                          "Optuna SQLite file cannot live there: give --optuna-storage (e.g. postgresql://...)")
    check_address(address)
    # the data, once: a split or an IPC that does not fit is one line here, not a failed trial each
    data = load_data(first.dataset, first.seed)
    check_ipc(data, max(study.trial_config(p, 0).distill.ipc for p in study.grid))
    store_uri = store or first.store
    if "://" not in store_uri:  # trials run in directories of their own: one absolute path, one store actor
        store_uri = str(Path(store_uri).expanduser().resolve())
    CheckpointStore(store_uri).check_writable()
    stages["checked"] = time.time()
    connect_ray(address)
    stages["ray"] = time.time()
    # the store actor (a worker process of its own) starts while the driver opens MLflow and Tune
    # sets up, rather than while the first trials wait for it
    get_store_actor(store_uri)
    if local_results:
        Path(local_results).mkdir(parents=True, exist_ok=True)
    # The local default keeps artifacts beside its database (MLflow's own default is ./mlruns of
    # whatever directory the driver happens to run in); a server decides for itself.
    artifacts_uri = None if mlflow_uri else Path(local_results, "mlartifacts").as_uri()
    mlflow_uri = mlflow_uri or tracking.default_tracking_uri(local_results)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # an outage is handled, not waited out
    points = study.grid[:-1] if study.control_added else study.grid
    swept = sorted(spec.search) if search_trials else sorted({k for p in points for k in p})
    # a search never resumes (its Optuna study continues instead), so each invocation gets an
    # experiment directory of its own: concurrent searches may share --results
    exp_name = _search_experiment_name(spec.name) if search_trials else spec.name
    exp_path = f"{results}/{exp_name}"
    parent = _open_parent(tracking, mlflow_uri, study, swept, exp_path, resume, artifacts_uri, on_test,
                          "search" if search_trials else "study")

    # The target data go into the object store once, as numpy buffers that every trial on a node
    # maps read-only (zero-copy; one copy per node), unless trials would load different data (a
    # swept dataset key, or seed-dependent per-class subsets).
    shared = share_data and not any(k.startswith("dataset.") for k in swept) and not (
        first.dataset.train_per_class or first.dataset.test_per_class)
    stages["parent"] = time.time()
    data_ref = ray.put(data.to_arrays()) if shared else None
    del data

    def trial(config: dict) -> None:
        marks = {"enter": time.time()}  # the trial's phases (unix times), in its final report as time.*
        ctx = tune.get_context()
        run = tracking.TrialRun(mlflow_uri, parent, trial_key(config))
        done, failed = run.claim()
        marks["claimed"] = time.time()
        if done is not None:  # finished before a driver crash: report it, do not run it again
            tune.report({**done, "trial.reused": 1.0, "trial.final": 1.0})
            return
        if failed is not None:  # it would fail the same way again
            raise TrialFailed(f"{failed} (an earlier attempt of this trial; not run again)")
        reset_peak_memory()
        sample = config.get("sample", 0)
        overrides = config["overrides"] if "overrides" in config else {k: v for k, v in config.items() if k != "sample"}
        cfg = replace(study.trial_config(overrides, sample), store=store_uri)
        along = "val" if cfg.dataset.val_per_class > 0 else "test"  # pipeline.intermediate_split
        out = Path(trial_dir(ctx)) / "out"
        repo = RayRepository(store_uri)
        where = placement_tags(repo)
        placement = {"ray.gpus": float(len([g for g in where["ray.gpu_ids"].split(",") if g])),
                     "device.cuda": float(where["ptmdd.device"] == "cuda")}
        name = run_name(overrides, f"#{sample}" if not search_trials else f"({ctx.get_trial_id()[-5:]})")
        run.start(cfg, {"ptmdd.study": spec.name, "ptmdd.trial_id": ctx.get_trial_id(), "ptmdd.swept": ",".join(swept),
                        "ptmdd.run_name": name,
                        "ptmdd.sample": str(sample), "ptmdd.point": json.dumps(overrides, sort_keys=True, default=str),
                        **where})
        marks["started"] = time.time()
        memory: dict[str, float] = {}

        every = max(cfg.distill.log_every, (cfg.distill.iterations or 0) // 20)  # ~20 progress reports

        def on_log(it: int, loss: float) -> None:  # sample memory while the data set is held
            for k, v in memory_mb().items():
                memory[k] = max(v, memory.get(k, 0.0))
            if it > 0 and it % every == 0:  # Tune's table moves; schedulers and Optuna wait for scores
                tune.report({"distill.iteration": it, "distill.loss": loss, "trial.final": 0.0})

        def on_eval(it: int, acc: float) -> None:
            tune.report({spec.metric: acc, "distill.iteration": it, "trial.final": 0.0})

        iterations = cfg.distill.iterations or 0
        checkpoints = TuneCheckpoints(cfg.distill.checkpoint_every or max(1, iterations // 10), trial_key(config),
                                      f"{results}/{exp_name}")
        try:
            data = ImageData.from_arrays(ray.get(data_ref)) if data_ref is not None else None
            memory.update(object_store_mb())
            marks["data"] = time.time()
            result = run_distill(cfg, out, progress=False, on_log=on_log, repo=repo, data=data,
                                 on_eval=on_eval if metric_split(spec.metric) == along else None,
                                 checkpoints=checkpoints)
            marks["distilled"] = time.time()
            on_log(-1, 0.0)
            run.finish(result, out, memory)
            marks["logged"] = time.time()
        except SystemExit:  # how Tune ends a trial its scheduler stopped (pruning)
            run.end("KILLED", {"ptmdd.stopped": "pruned by the scheduler on its intermediate evaluations"})
            raise
        except BaseException as e:
            run.end("FAILED", {"ptmdd.failure": f"{type(e).__name__}: {e}"[:1000],
                               **({"ptmdd.deterministic": "true"} if isinstance(e, (DivergenceError, ConfigError))
                                  else {})})
            raise
        marks["process"] = process_start_time()
        tune.report({**tracking.metrics_of(result), **memory, **placement, "trial.final": 1.0,
                     "mlflow.logged": float(run.online), **{f"time.{k}": v for k, v in marks.items()},
                     "time.pool_s": result["pool_stats"]["seconds"], "time.baseline_wait_s":
                     result["timing"].get("baseline_wait_seconds", 0.0), "time.guide_s":
                     result["timing"].get("guide_seconds", 0.0), "time.checkpoint_load_s": checkpoints.seconds["load"],
                     "time.checkpoint_save_s": checkpoints.seconds["save"]})

    trainable = tune.with_resources(trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    # progress reports (iteration, loss) come between the scored ones: Tune must not demand the
    # metric in each (ASHA and the Optuna searcher skip reports without it)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # every second checkpoint of a trial forces a snapshot of the experiment (CheckpointConfig's
    # num_to_keep); short trials checkpoint often, and Tune would warn each time
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if search_trials:
        from .search import TrialSeededTPESampler, open_storage

        storage = optuna_storage or f"sqlite:///{Path(local_results or '.') / 'optuna.db'}"
        # Several drivers may search one study at once (a shared storage): the storage survives a
        # concurrent schema creation, the study a concurrent create_study (OptunaSearch loads it),
        # and each trial is sampled with its own seed, from its storage-assigned number, so that
        # concurrent drivers propose different points while one driver's search repeats exactly.
        searcher = _PruningAwareOptunaSearch(space=optuna_space(spec.search), metric=spec.metric, mode=spec.mode,
                                             study_name=spec.name, storage=open_storage(storage),
                                             sampler=TrialSeededTPESampler(first.seed), tracking_uri=mlflow_uri,
                                             parent_id=parent)
        param_space, num_samples = {}, search_trials
    else:
        searcher, storage, num_samples = None, None, 1
        param_space = {"overrides": tune.grid_search(study.grid),
                       "sample": tune.grid_search(list(range(spec.samples)))}
    try:
        if resume and tune.Tuner.can_restore(exp_path):
            tuner = tune.Tuner.restore(exp_path, trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher, scheduler=(
                                                tune.schedulers.ASHAScheduler(
                                                    time_attr="distill.iteration", grace_period=first.eval.every,
                                                    max_t=max(first.distill.iterations, first.eval.every),
                                                    reduction_factor=2)
                                                if prune else None),
                                            num_samples=num_samples, max_concurrent_trials=spec.max_concurrent,
                                            reuse_actors=reuse_actors),
                run_config=tune.RunConfig(name=exp_name, storage_path=results,
                                          failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                          verbose=0 if quiet else 1))
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            stages["fit"] = time.time()
            grid = tuner.fit()  # Tune prints its tables whatever its verbosity: quiet keeps them from stdout
            stages["fitted"] = time.time()
    except BaseException:
        _close(tracking, mlflow_uri, parent, "FAILED", results, exp_path)
        raise
    errors = [r for r in grid if r.error is not None]
    on_cpu = sum(1 for r in grid if (r.metrics or {}).get("ray.gpus") and not (r.metrics or {}).get("device.cuda"))
    if on_cpu:  # said once, by the driver, not once per trial
        log.warning("Ray assigned GPUs to %d trial(s) but torch saw no CUDA device there: they ran on the CPU", on_cpu)
    rows = [{"overrides": r.config.get("overrides", {k: v for k, v in r.config.items() if k != "sample"}),
             "sample": r.config.get("sample", 0), "metrics": r.metrics or {}, "error": r.error is not None}
            for r in grid]
    _summarise_parent(tracking, mlflow_uri, parent, study, rows, local_results, exp_name)
    stages["summarised"] = time.time()
    _close(tracking, mlflow_uri, parent, "FAILED" if errors else "FINISHED", results, exp_path)
    trials = [{"overrides": r["overrides"], "sample": r["sample"], spec.metric: r["metrics"].get(spec.metric),
               "acc.mean": r["metrics"].get("acc.mean"), "baseline.random.mean": r["metrics"].get("baseline.random.mean"),
               "pruned": not r["error"] and not r["metrics"].get("trial.final")} for r in rows]
    return {"parent_run_id": parent, "trials": trials, "errors": len(errors), "tracking_uri": mlflow_uri,
            "results": exp_path, "optuna_storage": storage, "kind": "search" if search_trials else "study",
            "experiment_id": tracking.experiment_of(mlflow_uri, parent), "timing": {**stages, "end": time.time()}}


def _summarise_parent(tracking, mlflow_uri: str, parent: str, study: Study, rows: list[dict[str, Any]],
                      local_results: str | None, exp_name: str) -> None:
    """The parent run's summary metrics, the study file and the report, so that the experiment's
    runs table and the parent's page say how the study came out. MLflow away: logged to the log."""
    import tempfile

    import yaml

    from .report import write_report

    spec = study.spec
    metrics = summary_metrics(spec, rows)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            where = Path(local_results, exp_name, "report") if local_results else Path(tmp, "report")
            study_file = Path(tmp, "study.yaml")
            study_file.write_text(yaml.safe_dump(to_dict(spec), sort_keys=False))
            tracking.log_parent_summary(mlflow_uri, parent, metrics, [study_file])
            if metrics["trials.finished"]:
                write_report(mlflow_uri, spec.name, where, run_id=parent)
    except Exception as e:  # noqa: BLE001 - the summary is a convenience; the trials are logged
        log.warning("could not log the study's summary to MLflow (%s): %s", type(e).__name__, e)
