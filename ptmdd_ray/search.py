"""Optuna for ``ptmdd search`` when several drivers share one study (one Optuna storage, e.g.
PostgreSQL): opening the storage while another driver creates its schema, and a sampler whose
proposals differ between drivers yet repeat for a single one.

Kept apart from :mod:`ptmdd_ray.study` because Tune pickles its searcher (and so the sampler)
with the experiment state: the sampler must be a module-level class, and importing Optuna is
left to the search path.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import optuna


def open_storage(url: str, attempts: int = 6) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at ``url``. Opening creates the tables of a fresh database; two drivers
    doing that at the same moment race (PostgreSQL: ``duplicate key value violates unique
    constraint "pg_type_typname_nsp_index"``, or the Alembic version row twice). The schema is
    created in one transaction, so the loser has written nothing: it waits a moment and opens the
    storage again, which then finds the tables."""
    import sqlalchemy

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def check_directions(url: str, study_name: str, directions: list[str]) -> None:
    """Refuse, in one line, to continue an Optuna study whose objectives differ from this search's
    (a second objective added or dropped since it began): Optuna keeps a study's directions for life."""
    from .config import ConfigError

    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return  # no study yet; opening would create the file before anything is meant to be written
    try:
        summaries = optuna.get_all_study_summaries(open_storage(url), include_best_trial=False)
    except Exception:  # noqa: BLE001 - an unreadable storage is reported where it is opened
        return
    for s in summaries:
        if s.study_name == study_name:
            have = [d.name.lower() for d in s.directions]
            if have != directions:
                raise ConfigError(f"second_objective: the Optuna study {study_name!r} in the storage optimises "
                                  f"{have} and this search {directions}; keep its objectives or give the search "
                                  "another name (or storage)")


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of Optuna trial ``number`` of a search seeded with ``seed`` (well mixed:
    neighbouring numbers give unrelated streams)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededTPESampler(optuna.samplers.BaseSampler):
    """Optuna's TPE whose randomness for each trial is seeded by (``seed``, the trial's number).

    Why: Ray's ``OptunaSearch`` seeds one TPE sampler per driver. Seeded from the config's seed
    (plus the number of trials already in the study), two drivers that start on the same study at
    the same moment get the same seed, and TPE's first proposals (its random start-up trials, then
    its candidate draws) are identical: the two drivers evaluate the same points twice. An extra
    per-invocation component (time, pid, a random id) would separate them but make a single
    driver's search unrepeatable, and "trials RUNNING at start" misses drivers that start together.
    The trial number is what distinguishes them: the storage assigns it atomically (Optuna locks
    the study row while numbering), so concurrent drivers never share one, whereas a single driver
    numbers its trials 0, 1, 2, ... in every repetition of the same search and draws the same
    points (given the same results), and a second call continuing a study draws fresh ones, as
    ``seed + trials told`` did. TPE itself is otherwise unchanged (its default ``constant_liar``
    makes running trials, of every driver, count against proposing the same region again).

    A TPE sampler (seeded for the trial) is made in ``before_trial`` and dropped in
    ``after_trial``; TPE keeps no other state across trials that matters here (the history is read
    from the storage)."""

    def __init__(self, seed: int, **tpe_kwargs) -> None:
        self._seed = int(seed)
        self._tpe_kwargs = tpe_kwargs
        self._by_trial: dict[int, optuna.samplers.TPESampler] = {}

    def _tpe(self, trial) -> optuna.samplers.TPESampler:
        tpe = self._by_trial.get(trial.number)
        if tpe is None:
            tpe = self._by_trial[trial.number] = optuna.samplers.TPESampler(
                seed=trial_seed(self._seed, trial.number), **self._tpe_kwargs)
        return tpe

    def infer_relative_search_space(self, study, trial):
        return self._tpe(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._tpe(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        tpe = self._by_trial.pop(trial.number, None)
        if tpe is not None:
            tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Nothing to reseed: each trial's seed is fixed by its number (Optuna calls this when
        it runs trials in worker processes; Tune does not)."""
