"""ptmdd_ray.search: Optuna pieces that let several `ptmdd search` drivers share one study."""
import optuna
import pytest

from helpers import together

from ptmdd_ray.search import TrialSeededTPESampler, open_storage

SPACE = {"loss.clom": optuna.distributions.FloatDistribution(1.0, 100.0, log=True),
         "loss.cclom": optuna.distributions.FloatDistribution(0.0, 1.0)}


def _ask(study):
    return tuple(sorted(study.ask(fixed_distributions=SPACE).params.items()))


def test_one_driver_repeats_its_search_and_two_drivers_on_one_study_propose_different_points():
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def alone():
        study = optuna.create_study(sampler=TrialSeededTPESampler(0))
        return [_ask(study) for _ in range(4)]

    assert alone() == alone()  # reproducible: the same seed gives the same points
    # two drivers, each with its own sampler of the same seed, asking in turn on one storage
    storage = optuna.storages.InMemoryStorage()
    a, b = (optuna.create_study(storage=storage, study_name="s", load_if_exists=True,
                                sampler=TrialSeededTPESampler(0)) for _ in range(2))
    points = [_ask(s) for _ in range(3) for s in (a, b)]
    assert len(set(points)) == 6
    assert sorted(t.number for t in a.trials) == list(range(6))
    # what it replaces: one TPE per driver with the same seed proposes the same points twice
    storage = optuna.storages.InMemoryStorage()
    a, b = (optuna.create_study(storage=storage, study_name="s", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=0)) for _ in range(2))
    assert _ask(a) == _ask(b)


OPEN = r'''
import sys
import optuna
from ptmdd_ray.search import open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
print("ready", flush=True)
sys.stdin.readline()  # go: all at once
storage = open_storage(sys.argv[1])
optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
print("ok")
'''


def test_drivers_opening_a_fresh_postgresql_storage_at_once_all_get_it(postgres):
    """Optuna's schema creation races on a fresh PostgreSQL database (duplicate key in pg_type);
    open_storage retries, and every driver ends with the storage and the one study."""
    for _ in range(3):
        url = postgres.create_database()
        results = together(OPEN, url)
        assert all(rc == 0 and out.strip() == "ok" for rc, out, _ in results), results
        assert optuna.get_all_study_names(open_storage(url)) == ["s"]


def test_open_storage_gives_up_on_a_database_that_stays_broken(tmp_path):
    with pytest.raises(Exception):
        open_storage(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'optuna.db'}", attempts=2)
