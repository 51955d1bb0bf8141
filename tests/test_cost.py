"""What a run costs (:mod:`ptmdd_ray.cost`): the meter, the pool's share, the flat metrics; and
a real run's ``cost`` record read back from result.json and the store."""
import json
import time

import pytest

from ptmdd_ray.cost import Meter, Seconds, amortised, flat, pool_total


def test_a_meter_counts_wall_and_cpu_seconds_and_gpu_seconds_only_when_it_synchronises():
    with Meter() as idle:
        time.sleep(0.2)
    assert idle.seconds.wall >= 0.2 and idle.seconds.cpu < 0.1 and idle.seconds.gpu is None
    syncs = []
    with Meter(lambda: syncs.append(1)) as busy:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.2:  # CPU work counts as CPU seconds
            pass
    assert busy.seconds.cpu >= 0.2 and busy.seconds.gpu == busy.seconds.wall and len(syncs) == 2


def test_the_pools_share_divides_each_ptm_by_its_users_and_is_unknown_when_one_ptm_is():
    costs = {"a": Seconds(10.0, 20.0), "b": Seconds(30.0, 30.0)}
    assert amortised(costs, {"a": 2, "b": 3}) == Seconds(15.0, 20.0)
    assert pool_total(costs) == Seconds(40.0, 50.0)
    assert amortised({**costs, "old": None}, {}) is None  # stored before costs were recorded: not 0
    assert amortised({}, {}) == Seconds()  # no pool, no cost


def test_a_run_serving_twice_in_a_pool_is_paid_once_at_its_furthest_epoch():
    """MTT + CLoM: one PTM run is an expert (to epoch 3) and a guide (epoch 1); its price is its
    run up to epoch 3, once. The study counts the trajectory's key among a trial's PTMs."""
    from ptmdd_ray.pool import PTM, Pool

    def ptm(seed, epoch, wall):
        return PTM("ConvNetW32", seed, epoch, f"ConvNetW32-s{seed}-abc-e{epoch:04d}", 0.5, None,
                   train_cost=Seconds(wall, wall))

    guide, experts = Pool([ptm(0, 1, 1.0)], 0, 1), Pool([ptm(0, 3, 3.0), ptm(1, 3, 4.0)], 2, 0, Seconds(7.0, 7.0))
    both = guide.joined(experts)
    assert both.costs() == {"ConvNetW32-s0-abc-e0003": Seconds(3.0, 3.0), "ConvNetW32-s1-abc-e0003": Seconds(4.0, 4.0)}
    assert (both.trainings, both.hits, both.trained) == (2, 1, Seconds(7.0, 7.0))
    assert pool_total(both.costs()) == Seconds(7.0, 7.0)


def test_an_mtt_studys_trials_share_their_experts_cost(tmp_path):
    import yaml

    from ptmdd_ray.config import mtt_reach
    from ptmdd_ray.pool import pool_specs
    from ptmdd_ray.study.costs import ptm_users
    from ptmdd_ray.study_spec import load_study

    base = {"dataset": {"name": "digits", "im_size": 8, "val_per_class": 10}, "model": "ConvNetW32",
            "distill": {"method": "mtt", "ipc": 1, "iterations": 2, "syn_steps": 2, "expert_epochs": 1,
                        "max_start_epoch": 2},
            "pool": {"archs": ["ConvNetW32"], "seeds": 2, "epoch": 1}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"name": "m", "base": base, "metric": "val.acc.mean",
                                                     "sweep": {"loss.clom": {"grid": [0.0, 1.0]}}, "samples": 3}))
    study = load_study(tmp_path / "m.yaml")
    cfg = study.trial_config(study.grid[0], 0)
    last = {s.key(mtt_reach(cfg.distill)) for s in pool_specs(cfg)}
    guiding = {s.key(1) for s in pool_specs(cfg)}
    users = ptm_users(study)
    assert len(last) == 2 and {k: users[k] for k in last} == {k: 6 for k in last}  # every trial's experts
    assert {k: users[k] for k in guiding} == {k: 3 for k in guiding}  # only CLoM's trials guide


def test_flat_metrics_name_the_phase_and_the_clock_and_leave_unknowns_out():
    rec = {"distill": Seconds(2.0, 3.0).as_dict(), "eval": Seconds(1.0, 1.5, 1.0).as_dict(), "pool": None,
           "seconds": 3.0, "store_bytes": 10}
    assert flat(rec) == {"cost.distill.wall_s": 2.0, "cost.distill.cpu_s": 3.0, "cost.eval.wall_s": 1.0,
                         "cost.eval.cpu_s": 1.5, "cost.eval.gpu_s": 1.0, "cost.seconds": 3.0, "cost.store_bytes": 10.0}
    assert Seconds.from_dict(Seconds(1.0, 2.0, 3.0).as_dict()) == Seconds(1.0, 2.0, 3.0)
    assert Seconds.from_dict(None) is None and Seconds(1, 2) - Seconds(1, 1) == Seconds(0, 1)


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    """Two runs of one pool: the first trains its 2 PTMs, the second reuses them."""
    from ptmdd_ray.config import load_config
    from ptmdd_ray.pipeline import run_distill

    tmp = tmp_path_factory.mktemp("cost")
    cfg = load_config(overrides=[
        "dataset.name=digits", "model=ConvNetW32", "distill.ipc=1", "distill.iterations=3", "distill.batch_real=16",
        "eval.runs=1", "eval.epochs=3", "pool.archs=[ConvNetW32]", "pool.seeds=2", "pool.epoch=2",
        "pretrain.epochs=4", "loss.clom=1.0", f"store={tmp / 'store'}"])
    first = run_distill(cfg, tmp / "first", progress=False)
    second = run_distill(cfg, tmp / "second", progress=False, ptm_users={p["id"]: 4 for p in first["pool"]})
    return tmp, first, second


def test_a_run_records_what_it_trained_its_pools_price_and_its_amortised_share(guided):
    tmp, first, second = guided
    c1, c2 = first["cost"], second["cost"]
    assert c1["ptm_train"]["wall_s"] > 0 and c2["ptm_train"]["wall_s"] == 0  # the second trained nothing
    assert c1["store_bytes"] > 0 and c2["store_bytes"] == 0
    # the pool's price is the same whoever trained it: each PTM's seconds up to epoch 2, from the store
    assert c1["pool"] == c2["pool"] and 0 < c1["pool"]["wall_s"] <= c1["ptm_train"]["wall_s"]
    assert c1["pool_amortised"] == c1["pool"]  # alone
    assert c2["pool_amortised"]["wall_s"] == pytest.approx(c2["pool"]["wall_s"] / 4)
    for c in (c1, c2):
        phases = sum(c[k]["wall_s"] for k in ("guide", "distill", "eval", "baseline"))
        assert c["seconds"] == pytest.approx(phases + c["pool_amortised"]["wall_s"])
        assert c["distill"]["wall_s"] > 0 and c["eval"]["cpu_s"] > 0 and c["peak_rss_mb"] > 100
        assert "gpu_s" not in c["distill"]  # on the CPU no GPU seconds are claimed
    assert c2["baseline"]["wall_s"] == 0  # read back from the store
    written = json.loads((tmp / "second" / "result.json").read_text())["cost"]
    assert written == c2


def test_each_checkpoint_keeps_its_runs_seconds_up_to_its_epoch(guided):
    from ptmdd_ray.store import CheckpointStore

    tmp, first, _ = guided
    store = CheckpointStore(tmp / "store")
    metas = {m["epoch"]: m for m in store.ls() if m["seed"] == 0}
    assert set(metas) == {2}  # only the pool's epoch was asked for
    ptm = next(p for p in first["pool"] if p["seed"] == 0)
    assert ptm["train_cost"] == metas[2]["train_cost"] and metas[2]["train_cost"]["cpu_s"] > 0


def test_store_stats_gives_each_ptms_training_seconds_and_bytes_and_the_totals(guided):
    import subprocess
    import sys

    from ptmdd_ray.store import CheckpointStore

    tmp, first, _ = guided
    store = tmp / "store"
    out = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "store", "stats", "--store", str(store), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    metas = {m["key"]: m for m in CheckpointStore(store).ls()}
    assert {r["key"] for r in stats["ptms"]} == set(metas) and len(metas) == 2
    for r in stats["ptms"]:
        assert r["bytes"] == metas[r["key"]]["bytes"] and r["train_wall_s"] == metas[r["key"]]["train_cost"]["wall_s"]
    assert stats["bytes"] == sum(m["bytes"] for m in metas.values())
    assert stats["train_wall_s"] == pytest.approx(sum(m["train_cost"]["wall_s"] for m in metas.values()))
    assert stats["trainings"] == 2 and stats["without_cost"] == 0
    text = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "store", "stats", "--store", str(store)],
                          capture_output=True, text=True, timeout=120).stdout
    assert all(k in text for k in metas) and "s wall" in text and text.startswith("checkpoints 2")
