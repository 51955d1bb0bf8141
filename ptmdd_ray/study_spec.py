"""Study files: what a study is, checked in full before anything runs (no Ray, no torch here).

A study file wraps a core config (``base``) with a ``sweep`` (grid/choice per dotted key) and
optional ``cases`` (override sets that go together, e.g. a PTM source with the loss that suits its
label space), crossed with each other, repeats
(``samples``, each with its own seed), per-trial ``resources`` and ``max_concurrent``, a ``search``
space for ``ptmdd search`` and the ``claims`` that ``ptmdd report`` tests. Every grid point is
validated before anything runs. :mod:`ptmdd_ray.study` runs what this module describes;
:mod:`ptmdd_ray.report` reads it back, so both sit above this module and it imports neither.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any

from .cost import metric_names
from .config import (Config, ConfigError, anchor_paths, build_config, check, eval_split, flatten, from_dict,
                     load_yaml, parse_override, set_dotted)

BEST = "best"  # a claim's selector value: the swept value chosen on the study's (validation) metric
SEARCH_KINDS = ("uniform", "loguniform", "int", "choice")


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
    second_objective: str | None = None  # a search's second objective, minimised (e.g. cost.seconds)
    metric: str | None = None  # null: val.acc.mean with a validation split, else acc.mean (said to be on test)
    mode: str = "max"
    samples: int = 1
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int = 2
    max_failures: int = 2
    matrix: str | None = None  # a swept key: `ptmdd report` draws it against the other swept keys
    control: dict[str, Any] | None = None  # the plain method, run once per sample beside the grid
    claims: list[Claim] = field(default_factory=list)


@dataclass(frozen=True)
class Study:
    spec: StudyConfig
    base: dict[str, Any]  # the core config mapping (validated)
    grid: list[dict[str, Any]]  # one dict of dotted overrides per grid point
    control_added: bool = False  # the control is the last grid point, not one of the sweep's own
    cwd: str = field(default_factory=os.getcwd)  # where relative paths point (trials run elsewhere)

    def trial_config(self, overrides: dict[str, Any], sample: int) -> Config:
        data = copy.deepcopy(self.base)
        for k, v in copy.deepcopy(overrides).items():  # anchor_paths edits in place: not the grid's own
            set_dotted(data, k, v)
        data["seed"] = int(data.get("seed", 0)) + sample
        return build_config(anchor_paths(data, self.cwd))


# ------------------------------------------------------------------ loading


def load_study(path: str | Path, overrides: list[str] = ()) -> Study:
    """Parse and validate a study file; every grid point must give a valid core config."""
    spec, base = _parse(Path(path), overrides)
    first = build_config(copy.deepcopy(base))
    known = set(flatten(first))
    if spec.metric is None:  # choose on validation where the data hold one out, never silently on test
        spec = replace(spec, metric="val.acc.mean" if eval_split(first) == "val" else "acc.mean")
    _check_settings(spec)
    axes = _sweep_axes(spec, known)
    grid, control_added = _expand_grid(spec, axes, known)
    study = Study(spec, base, grid, control_added=control_added)
    _check_points(study)
    varied = set(axes) | {k for case in spec.cases for k in case}
    check(spec.matrix is None or spec.matrix in varied, "matrix", f"{spec.matrix!r} is not a swept key")
    for i, claim in enumerate(spec.claims):
        _check_claim(i, claim, spec, grid, varied)
    for key, dist in spec.search.items():
        _check_search_key(study, key, dist, known)
    return study


def _parse(path: Path, overrides: list[str]) -> tuple[StudyConfig, dict[str, Any]]:
    """The study file with its ``--set`` overrides, and its core config mapping (``base``, inline
    or a YAML file relative to the study file)."""
    data = load_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    spec = from_dict(StudyConfig, data)
    base = spec.base
    if isinstance(base, str):
        base = load_yaml(path.parent / base if not Path(base).is_absolute() else Path(base))
    return spec, base


def _check_settings(spec: StudyConfig) -> None:
    """The study's own numbers: repeats, concurrency, failures, direction, resources."""
    check(spec.samples >= 1, "samples", f"must be >= 1, got {spec.samples}")
    check(spec.max_concurrent >= 1, "max_concurrent", f"must be >= 1, got {spec.max_concurrent}")
    check(spec.max_failures >= 0, "max_failures", f"must be >= 0, got {spec.max_failures}")
    check(spec.mode in ("max", "min"), "mode", f"expected max or min, got {spec.mode!r}")
    check(spec.resources.cpu > 0 and spec.resources.gpu >= 0, "resources", "cpu must be > 0 and gpu >= 0")
    _check_second_objective(spec)


# what every trial reports that a second objective may minimise, beside cost.* (cost.metric_names)
TIMING_METRICS = ("distill.seconds", "distill.seconds_per_iteration", "eval.seconds")


def _check_second_objective(spec: StudyConfig) -> None:
    """A second objective is a cost or timing metric that every trial of the search reports: a
    name no trial reports (or a GPU figure of CPU trials) is refused before anything starts."""
    obj = spec.second_objective
    if obj is None:
        return
    check(bool(spec.search), "second_objective", "needs a search space (`search`): a grid has no objectives")
    reported = (*metric_names(gpu=spec.resources.gpu > 0), *TIMING_METRICS)
    if obj in metric_names(gpu=True) and obj not in reported:
        raise ConfigError(f"second_objective: {obj} is a GPU figure and the trials ask for no GPU (resources.gpu: 0)")
    check(obj in reported, "second_objective", f"{obj!r} is not a metric every trial reports; one of "
          f"cost.seconds, cost.<phase>.<wall_s|cpu_s> ({', '.join(('guide', 'distill', 'eval', 'baseline'))}, ...), "
          f"{', '.join(TIMING_METRICS)}")
    check(obj != spec.metric, "second_objective", "is the study's metric itself")


def objectives(spec: StudyConfig) -> list[tuple[str, str]]:
    """A search's objectives as (metric, "max"|"min"): the study's metric, then the second one (minimised)."""
    return [(spec.metric, spec.mode)] + ([(spec.second_objective, "min")] if spec.second_objective else [])


def _sweep_axes(spec: StudyConfig, known: set[str]) -> dict[str, list[Any]]:
    """{dotted key: values} of the ``sweep``, every key a config key with a non-empty list."""
    axes = {}
    for key, dist in spec.sweep.items():
        check(key in known, f"sweep.{key}", "not a config key (`ptmdd config` lists them)")
        check(len(dist) == 1 and next(iter(dist)) in ("grid", "choice"), f"sweep.{key}",
                 "expected {grid: [...]} or {choice: [...]}")
        values = next(iter(dist.values()))
        check(isinstance(values, list) and len(values) >= 1, f"sweep.{key}", "needs a non-empty list")
        axes[key] = values
    return axes


def _expand_grid(spec: StudyConfig, axes: dict[str, list[Any]], known: set[str]) -> tuple[list[dict], bool]:
    """The grid points: every case crossed with every combination of the axes, and the control
    appended when it is not one of them already; and whether it was appended."""
    for i, case in enumerate(spec.cases):
        for key in case:
            check(key in known, f"cases[{i}].{key}", "not a config key")
    grid = [dict(zip(axes, combo)) for combo in product(*axes.values())] if axes else [{}]
    grid = [{**case, **point} for case in (spec.cases or [{}]) for point in grid]
    if spec.control is None:
        return grid, False
    for key in spec.control:
        check(key in known, f"control.{key}", "not a config key")
    added = spec.control not in grid
    if added:
        grid.append(dict(spec.control))
    return grid, added


def _check_points(study: Study) -> None:
    """Every grid point gives a valid core config, with a validation split if the metric needs one."""
    spec = study.spec
    for point in study.grid:
        try:
            cfg = study.trial_config(point, 0)
        except ConfigError as e:
            raise ConfigError(f"sweep point {point}: {e}") from None
        check(metric_split(spec.metric) == "test" or eval_split(cfg) == "val", "metric",
                 f"{spec.metric} is a validation metric but dataset.val_per_class is 0 at {point or 'the base'} "
                 "(no validation split)")


def _check_claim(i: int, claim: Claim, spec: StudyConfig, grid: list[dict[str, Any]], varied: set[str]) -> None:
    """A claim says its finding and compares what the grid holds: each side a selector that
    matches a grid point (``best`` only on swept keys, chosen on a validation metric), or
    ``control``/``random`` on the ``than`` side."""
    check(bool(claim.claim), f"claims[{i}].claim", "needs the finding in words")
    for side in ("better", "than"):
        sel = getattr(claim, side)
        where = f"claims[{i}].{side}"
        if isinstance(sel, str):
            check(side == "than" and sel in ("control", "random"), where, "expected overrides, control or random")
            check(sel != "control" or spec.control is not None, f"claims[{i}].than", "the study has no control")
            continue
        free = [k for k, v in sel.items() if v == BEST]
        check(not free or metric_split(spec.metric) == "val", where,
                 f"'{BEST}' is chosen on the study's metric, and {spec.metric} is not a validation metric")
        for k in free:
            check(k in varied, f"{where}.{k}", f"'{BEST}' needs a swept key, and {k} is not swept")
        fixed = {k: v for k, v in sel.items() if v != BEST}
        check(any(matches(p, fixed) for p in grid), where, f"{sel} matches no grid point")


def _check_search_key(study: Study, key: str, dist: dict[str, list[Any]], known: set[str]) -> None:
    """One ``search`` entry: a config key with one distribution of :data:`SEARCH_KINDS`, whose
    ends (every choice, or both ends of a range) give valid configs."""
    check(key in known, f"search.{key}", "not a config key")
    check(len(dist) == 1 and next(iter(dist)) in SEARCH_KINDS, f"search.{key}",
             f"expected one of {{{', '.join(SEARCH_KINDS)}: ...}}")
    kind, values = next(iter(dist.items()))
    if kind == "choice":
        check(isinstance(values, list) and len(values) >= 1, f"search.{key}", "choice needs a non-empty list")
    else:
        check(isinstance(values, list) and len(values) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), f"search.{key}",
            f"{kind} needs [low, high]")
        check(values[0] <= values[1], f"search.{key}", f"low {values[0]} > high {values[1]}")
        check(kind != "loguniform" or values[0] > 0, f"search.{key}", "loguniform needs low > 0")
    for v in values:  # the ends of every range must give valid configs
        try:
            study.trial_config({key: v}, 0)
        except ConfigError as e:
            raise ConfigError(f"search.{key}: {v!r} gives an invalid config ({e})") from None


# ------------------------------------------------------------------ choosing on validation


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
    if prune and spec.second_objective:
        raise ConfigError("prune: a search with a second_objective is multi-objective, and Optuna prunes "
                          "single-objective studies only; drop --prune or the second objective")
    split = metric_split(spec.metric)
    if search and split == "test" and not select_on_test:
        raise ConfigError(f"metric: {spec.metric} is test accuracy and a search chooses by it; choose on "
                          "val.acc.mean (with dataset.val_per_class > 0), or pass --select-on-test")
    along = eval_split(first)
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


# ------------------------------------------------------------------ names


def label(value: Any, digits: int | None = None) -> str:
    """A swept value as a short label: lists joined by '+', mappings as k=v, None as 'default';
    floats to ``digits`` significant digits where given (run names: ``30.0`` reads ``30``), else
    as Python writes them (the report's tables: ``30.0``)."""
    if value is None:
        return "default"
    if isinstance(value, float) and digits:
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return "+".join(label(v, digits) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={label(v, digits)}" for k, v in sorted(value.items()))
    return str(value)


def run_name(point: dict[str, Any], tag: str) -> str:
    """A child run's name in the MLflow UI: its grid point with each key by its last dotted part
    (the full key where two would read alike) and ``tag`` (the sample ``#0``, or a search trial's
    id), e.g. ``clom=30 cclom=0 #1``. Unique within a study: grid points differ, and so do tags."""
    last = [k.rsplit(".", 1)[-1] for k in point]
    keys = [short if last.count(short) == 1 else k for k, short in zip(point, last)]
    body = " ".join(f"{k}={label(v, 4)}" for k, v in zip(keys, point.values())) or "base"
    return f"{body} {tag}"
