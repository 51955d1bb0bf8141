"""The store actor on a real local Ray cluster: single flight, recovery after a restart, stats."""
import json
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ptmdd_ray.config import build_config  # noqa: E402
from ptmdd_ray.data import load_data  # noqa: E402
from ptmdd_ray.pipeline import resolve_pool  # noqa: E402
from ptmdd_ray.pool import pool_specs  # noqa: E402
from ptmdd_ray.service import RayRepository, get_store_actor, init_local_ray  # noqa: E402
from ptmdd_ray.store import CheckpointStore  # noqa: E402

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


def test_concurrent_requests_for_a_missing_ptm_train_it_once(local_ray, tmp_path):
    cfg = _cfg(tmp_path)
    spec = pool_specs(cfg)[0]
    actor = get_store_actor(cfg.store)
    results = ray.get([actor.fetch.remote(spec, 1, [1, 2]) for _ in range(5)])
    assert sorted(r[2] for r in results) == ["shared"] * 4 + ["trained"]
    weights = [ray.get(r[1]) for r in results]
    assert all(np.array_equal(w["features.0.weight"], weights[0]["features.0.weight"]) for w in weights)
    stats = CheckpointStore(cfg.store).stats()
    assert stats["trainings"] == 1 and stats["hits"] == 4 and stats["checkpoints"] == 2  # epochs 1 and 2

    # the actor dies; Ray restarts it, it recovers from storage and trains nothing
    ray.kill(actor, no_restart=False)
    meta, ref, outcome = ray.get(get_store_actor(cfg.store).fetch.remote(spec, 2, [1, 2]))
    assert outcome == "hit" and meta["epoch"] == 2
    assert CheckpointStore(cfg.store).stats()["trainings"] == 1

    out = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "store", "stats", "--json", "--store", cfg.store],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"checkpoints": 2, "trainings": 1, "hits": 5, "bytes": stats["bytes"]}
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
    ray.kill(repo.actor)


def test_the_actor_never_serves_a_corrupt_checkpoint(local_ray, tmp_path):
    cfg = _cfg(tmp_path)
    spec = pool_specs(cfg)[0]
    actor = get_store_actor(cfg.store)
    ray.get(actor.fetch.remote(spec, 1, [1]))
    path = tmp_path / "store" / "ptm" / f"{spec.key(1)}.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # truncated on disk
    meta, ref, outcome = ray.get(actor.fetch.remote(spec, 1, [1]))
    assert outcome == "trained"  # quarantined and trained again, not served
    CheckpointStore(cfg.store).load(spec.key(1))  # intact again
    assert len(list((tmp_path / "store" / "quarantine").iterdir())) == 2
    ray.kill(actor)


def test_fifty_concurrent_pool_requests_are_served(local_ray, tmp_path):
    cfg = _cfg(tmp_path, seeds=2)
    specs = pool_specs(cfg)
    actor = get_store_actor(cfg.store)
    results = ray.get([actor.fetch.remote(specs[i % 2], 1, [1]) for i in range(50)])
    assert sorted(r[2] for r in results).count("trained") == 2
    assert all(r[0]["key"] in (specs[0].key(1), specs[1].key(1)) for r in results)
    assert CheckpointStore(cfg.store).stats()["trainings"] == 2
    ray.kill(actor)


def test_a_request_in_flight_when_the_actor_dies_is_retried_and_completes(local_ray, tmp_path):
    """Kill the actor while a request waits on a training: Ray restarts the actor and retries the
    call (max_task_retries); the store's lock keeps the training from happening twice."""
    import time

    cfg = _cfg(tmp_path)
    spec = pool_specs(cfg)[0]
    actor = get_store_actor(cfg.store)
    pending = actor.fetch.remote(spec, 3, [3])
    time.sleep(1.0)  # the training task is under way
    ray.kill(actor, no_restart=False)
    meta, ref, outcome = ray.get(pending, timeout=300)
    assert meta["epoch"] == 3 and ray.get(ref)
    assert CheckpointStore(cfg.store).stats()["trainings"] == 1
    ray.kill(get_store_actor(cfg.store))
