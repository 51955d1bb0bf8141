"""The store actor on a real local Ray cluster: single flight, recovery after a restart, stats."""
import json
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from ptmdd_ray.config import build_config  # noqa: E402
from ptmdd_ray.data import load_data  # noqa: E402
from ptmdd_ray.pool import pool_specs, resolve_pool  # noqa: E402
from ptmdd_ray.service import RayRepository, get_store_actor, init_local_ray  # noqa: E402
from ptmdd_ray.store import CheckpointRepository, CheckpointStore  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _cfg(tmp_path, seeds=1):
    return build_config({
        "dataset": {"name": "digits", "im_size": 8, "train_per_class": 20},
        "pool": {"archs": ["ConvNetW32"], "seeds": seeds, "epoch": 1},
        "pretrain": {"batch": 64, "save_epochs": [2]},
        "store": str(tmp_path / "store"),
    })


@ray.remote(num_cpus=0)
def _trial_like(uri: str, spec, epoch: int, epochs: list[int]):
    """What a trial does for one PTM: ask the store actor, train under the store's lock if missing."""
    from ptmdd_ray.data import load_data
    from ptmdd_ray.pool import PTM_DATA_SEED

    repo = RayRepository(uri)
    ckpt = repo.get(spec, epoch, epochs, lambda: load_data(spec.source, PTM_DATA_SEED))
    return repo.trainings, ckpt.tensors["features.0.weight"].numpy()


def test_concurrent_requests_for_a_missing_ptm_train_it_once(local_ray, tmp_path):
    cfg = _cfg(tmp_path)
    spec = pool_specs(cfg)[0]
    results = ray.get([_trial_like.remote(cfg.store, spec, 1, [1, 2]) for _ in range(5)])
    assert sorted(r[0] for r in results) == [0, 0, 0, 0, 1]  # one caller trained, four waited and loaded
    assert all(np.array_equal(r[1], results[0][1]) for r in results)
    stats = CheckpointStore(cfg.store).stats()
    assert stats["trainings"] == 1 and stats["hits"] == 4 and stats["checkpoints"] == 2  # epochs 1 and 2

    # the actor dies; Ray restarts it, it recovers from storage and trains nothing
    actor = get_store_actor(cfg.store)
    ray.kill(actor, no_restart=False)
    meta, ref = ray.get(get_store_actor(cfg.store).fetch.remote(spec.key(2)))
    assert meta["epoch"] == 2 and CheckpointStore(cfg.store).stats()["trainings"] == 1

    out = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "store", "stats", "--json", "--store", cfg.store],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    totals = {k: v for k, v in json.loads(out.stdout).items() if k in ("checkpoints", "trainings", "hits", "bytes")}
    assert totals == {"checkpoints": 2, "trainings": 1, "hits": 5, "bytes": stats["bytes"]}
    ray.kill(get_store_actor(cfg.store))


def test_pipeline_resolves_a_pool_through_the_actor(local_ray, tmp_path):
    cfg = _cfg(tmp_path, seeds=2)
    data = load_data(cfg.dataset)
    repo = RayRepository(cfg.store)
    pool = resolve_pool(cfg, data, "cpu", progress=False, repo=repo)
    assert (pool.trainings, pool.hits) == (2, 0) and [p.seed for p in pool.ptms] == [0, 1]
    again = resolve_pool(cfg, data, "cpu", progress=False, repo=repo)
    assert (again.trainings, again.hits) == (0, 2)
    for a, b in zip(pool.ptms, again.ptms):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(np.array_equal(sa[k].numpy(), sb[k].numpy()) for k in sa)
    assert ray.get(repo.actor.stats.remote())["served"] == 2  # one object per PTM, served again
    ray.kill(repo.actor)


def test_the_ray_repository_is_a_checkpoint_repository(local_ray, tmp_path):
    """What run_distill(repo=...) and resolve_pool take: the Ray one stands in for the local one."""
    repo = RayRepository(_cfg(tmp_path).store)
    assert isinstance(repo, CheckpointRepository) and (repo.trainings, repo.hits) == (0, 0)
    ray.kill(repo.actor)


def test_the_actor_never_serves_a_corrupt_checkpoint(local_ray, tmp_path):
    cfg = _cfg(tmp_path)
    spec = pool_specs(cfg)[0]
    trained, _ = ray.get(_trial_like.remote(cfg.store, spec, 1, [1]))
    assert trained == 1
    path = tmp_path / "store" / "ptm" / f"{spec.key(1)}.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # truncated on disk
    actor = get_store_actor(cfg.store)
    ray.kill(actor, no_restart=False)  # a fresh actor has served nothing yet: it reads the store
    assert ray.get(get_store_actor(cfg.store).fetch.remote(spec.key(1))) is None  # refused, not served
    assert len(list((tmp_path / "store" / "quarantine").iterdir())) == 2
    trained, _ = ray.get(_trial_like.remote(cfg.store, spec, 1, [1]))
    assert trained == 1  # trained again by the caller
    CheckpointStore(cfg.store).load(spec.key(1))  # intact again
    ray.kill(get_store_actor(cfg.store))


def test_a_replaced_checkpoint_is_not_served_from_the_actors_cache(local_ray, tmp_path):
    cfg = _cfg(tmp_path)
    spec = pool_specs(cfg)[0]
    ray.get(_trial_like.remote(cfg.store, spec, 1, [1]))
    actor = get_store_actor(cfg.store)
    first, _ = ray.get(actor.fetch.remote(spec.key(1)))
    store = CheckpointStore(cfg.store)
    ckpt = store.load(spec.key(1))
    store.save(spec.key(1), {k: v + 1 for k, v in ckpt.tensors.items()}, {**ckpt.meta, "test_accuracy": 0.5})
    meta, ref = ray.get(actor.fetch.remote(spec.key(1)))
    assert meta["sha256"] != first["sha256"] and meta["test_accuracy"] == 0.5
    assert np.array_equal(ray.get(ref)["features.0.weight"], ckpt.tensors["features.0.weight"].numpy() + 1)
    ray.kill(actor)


def test_a_request_in_flight_when_the_actor_dies_is_retried_and_completes(local_ray, tmp_path):
    """Kill the actor while requests are in flight: Ray restarts it and retries the calls
    (max_task_retries); nothing is trained twice."""
    cfg = _cfg(tmp_path)
    spec = pool_specs(cfg)[0]
    ray.get(_trial_like.remote(cfg.store, spec, 3, [3]))
    actor = get_store_actor(cfg.store)
    pending = [actor.fetch.remote(spec.key(3)) for _ in range(20)]
    ray.kill(actor, no_restart=False)
    # every call completes; the weights of an answer given before the kill died with the actor
    # that owned them (the next test: a trial then reads the store itself)
    assert all(meta["epoch"] == 3 for meta, _ in ray.get(pending, timeout=300))
    assert RayRepository(cfg.store).stored(spec.key(3)).meta["epoch"] == 3  # served by the restarted actor
    assert CheckpointStore(cfg.store).stats()["trainings"] == 1
    ray.kill(get_store_actor(cfg.store))


class _DiesAfterAnswering:
    """The store actor, as seen by a trial whose answer arrives just before the actor dies."""

    def __init__(self, actor):
        self.actor = actor

    @property
    def fetch(self):
        return self

    def remote(self, key):
        before = ray.get(self.actor.pid.remote())
        answer = self.actor.fetch.remote(key)
        ray.wait([answer])
        ray.kill(self.actor, no_restart=False)  # the weights' object had this actor as its owner
        deadline = time.time() + 120
        while ray.get(self.actor.pid.remote(), timeout=120) == before:  # until the restarted one answers
            assert time.time() < deadline, "the store actor was not restarted"
            time.sleep(0.1)
        return answer


def test_weights_lost_with_a_dead_actor_are_read_from_the_store(local_ray, tmp_path, caplog):
    cfg = _cfg(tmp_path)
    spec = pool_specs(cfg)[0]
    ray.get(_trial_like.remote(cfg.store, spec, 1, [1]))
    repo = RayRepository(cfg.store)
    _, ref = ray.get(repo.actor.fetch.remote(spec.key(1)))  # the actor's object, served again below
    repo.actor = _DiesAfterAnswering(repo.actor)
    with caplog.at_level(logging.WARNING, logger="ptmdd_ray.service"):
        ckpt = repo.stored(spec.key(1))
    assert "died after serving" in caplog.text
    with pytest.raises(ray.exceptions.ObjectLostError):  # the hazard: the object went with its owner
        ray.get(ref, timeout=60)
    expected = CheckpointStore(cfg.store).load(spec.key(1))
    assert ckpt.meta["sha256"] == expected.meta["sha256"]
    assert all(torch.equal(ckpt.tensors[k], v) for k, v in expected.tensors.items())
    assert CheckpointStore(cfg.store).stats()["trainings"] == 1
    ray.kill(get_store_actor(cfg.store))
