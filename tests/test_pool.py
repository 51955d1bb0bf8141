import pytest
import torch

from ptmdd_ray import losses
from ptmdd_ray.config import PRECISIONS, ConfigError, DatasetConfig, build_config
from ptmdd_ray.data import load_data
from ptmdd_ray.pool import (PTMGuide, PTMRepository, PTMSpec, compiled_forward, pool_specs, pretrain, resolve_pool,
                            save_epochs)
from ptmdd_ray.store import CheckpointRepository, CheckpointStore, IntegrityError
from ptmdd_ray.train import accuracy, cpu_has_bf16, new_model, train_classifier

DEVICE = torch.device("cpu")


def _cfg(tmp_path, **pool):
    return build_config({
        "dataset": {"name": "digits", "im_size": 8, "train_per_class": 20},
        "model": "ConvNetW32",
        "pool": {"archs": ["ConvNetW32"], "seeds": 2, "epoch": 1, **pool},
        "pretrain": {"epochs": 3, "batch": 64, "save_epochs": [3]},
        "store": str(tmp_path / "store"),
    })


def test_spec_key_is_content_addressed(tmp_path):
    cfg = _cfg(tmp_path)
    a, b = pool_specs(cfg)
    assert a.seed == 0 and b.seed == 1 and a.run_id != b.run_id
    assert a.key(2).startswith("ConvNetW32-s0-") and a.key(2).endswith("-e0002")
    # where the data lives is not part of a PTM's identity; what it is, is
    moved = PTMSpec(a.arch, a.seed, a.source.__class__(**{**a.source.__dict__, "root": "/elsewhere"}), a.pretrain)
    assert moved.run_id == a.run_id
    other = PTMSpec(a.arch, a.seed, a.source.__class__(**{**a.source.__dict__, "domain": "invert"}), a.pretrain)
    assert other.run_id != a.run_id
    # a file source is one source however its path is spelled (a study anchors ../ paths where it runs)
    spelled = [PTMSpec(a.arch, a.seed, DatasetConfig(name=f"parquet:{p}"), a.pretrain)
               for p in ("/data/x.parquet", "/work/exp/../../data/x.parquet", "/data/./x.parquet")]
    assert len({s.run_id for s in spelled}) == 1
    assert PTMSpec(a.arch, a.seed, DatasetConfig(name="parquet:/data/y.parquet"), a.pretrain).run_id != spelled[0].run_id
    # bf16 on the CPU trains other weights than the default's fp32 there: another PTM
    assert len({PTMSpec(a.arch, a.seed, a.source, a.pretrain, p).run_id for p in PRECISIONS}) == 3
    assert save_epochs(cfg) == [1, 3]


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU computes no bf16 natively")
def test_bf16_cpu_ptms_train_and_score_through_the_compiled_forward(tmp_path):
    """Under ``bf16-cpu`` a PTM trains and is scored through the compiled forward (where its bf16
    pays), taking the eager bf16 run's path up to rounding; other precisions stay eager."""
    cfg = _cfg(tmp_path)
    data = load_data(cfg.dataset)
    model = new_model("ConvNetW32", (1, 10, 8), seed=0)
    assert compiled_forward(model, "fp32") is None and compiled_forward(model, "bf16") is None
    spec = PTMSpec("ConvNetW32", 0, cfg.dataset, cfg.pretrain, "bf16-cpu")
    state, acc, _ = pretrain(spec, [1], data, progress=False)[1]
    t = cfg.pretrain
    eager = train_classifier(model, data.x_train, data.y_train, epochs=1, lr=t.lr, momentum=t.momentum,
                             weight_decay=t.weight_decay, batch=t.batch, milestones=(1, 2),
                             gen=torch.Generator().manual_seed(0), precision="bf16-cpu")
    for k, v in eager.state_dict().items():
        assert torch.allclose(state[k], v, atol=2e-2), k
    assert acc["test"] == pytest.approx(accuracy(eager, data.x_test, data.y_test, precision="bf16-cpu"), abs=0.02)


def test_resolution_reuses_what_exists_and_trains_what_is_missing(tmp_path):
    cfg = _cfg(tmp_path)
    data = load_data(cfg.dataset)
    pool = resolve_pool(cfg, data, DEVICE, progress=False)
    assert (pool.trainings, pool.hits) == (2, 0)
    store = CheckpointStore(cfg.store)
    assert len(store.keys()) == 4  # epochs 1 and 3 of both seeds, from one run each
    assert all(not p.model.training and not any(q.requires_grad for q in p.model.parameters()) for p in pool.ptms)
    assert all(0.0 <= p.test_accuracy <= 1.0 for p in pool.ptms)

    # more seeds: the two existing PTMs are reused, one is trained
    more = _cfg(tmp_path, seeds=3)
    pool3 = resolve_pool(more, data, DEVICE, progress=False)
    assert (pool3.trainings, pool3.hits) == (1, 2)
    # a sub-optimal epoch saved on the way by the same runs costs nothing
    final = build_config({**_asdict(more), "pool": {"archs": ["ConvNetW32"], "seeds": 3, "epoch": 3}})
    pool_final = resolve_pool(final, data, DEVICE, progress=False)
    assert (pool_final.trainings, pool_final.hits) == (0, 3)
    # the same weights come back
    again = resolve_pool(cfg, data, DEVICE, progress=False)
    for p, q in zip(pool.ptms, again.ptms):
        assert all(torch.equal(a, b) for a, b in zip(p.model.state_dict().values(), q.model.state_dict().values()))


def _serve(repo: CheckpointRepository, spec, data):
    """What resolve_pool asks of a repository, and all it asks: through the Protocol only."""
    return repo.get(spec, 1, [1, 3], lambda: data), (repo.trainings, repo.hits)


def test_the_local_repository_serves_through_the_checkpoint_repository_protocol(tmp_path):
    cfg = _cfg(tmp_path, seeds=1)
    data = load_data(cfg.dataset)
    repo = PTMRepository(CheckpointStore(cfg.store), progress=False)
    assert isinstance(repo, CheckpointRepository)
    spec = pool_specs(cfg)[0]
    first, counts = _serve(repo, spec, data)
    assert counts == (1, 0) and first.key == spec.key(1) and first.meta["epoch"] == 1
    again, counts = _serve(repo, spec, data)
    assert counts == (1, 1)  # trained once, then served from the store
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    assert CheckpointStore(cfg.store).has(spec.key(3))  # the run's other epoch, saved on the way


def _asdict(cfg):
    from ptmdd_ray.config import to_dict

    return to_dict(cfg)


def test_tampered_pool_checkpoint_is_not_loaded(tmp_path):
    cfg = _cfg(tmp_path, seeds=1)
    data = load_data(cfg.dataset)
    resolve_pool(cfg, data, DEVICE, progress=False)
    key = pool_specs(cfg)[0].key(1)
    path = tmp_path / "store" / "ptm" / f"{key}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=key):
        CheckpointStore(cfg.store).load(key)
    pool = resolve_pool(cfg, data, DEVICE, progress=False)  # quarantined, never loaded, trained again
    assert pool.trainings == 1 and pool.hits == 0
    CheckpointStore(cfg.store).load(key)  # intact again
    quarantined = sorted(p.name for p in (tmp_path / "store" / "quarantine").iterdir())
    assert len(quarantined) == 2 and all(n.startswith(key) for n in quarantined)
    assert bytes(raw) in [(tmp_path / "store" / "quarantine" / n).read_bytes() for n in quarantined]


def _train_in_process(store_root, spec, epochs, out):
    from ptmdd_ray.pool import train_run

    data = load_data(spec.source)
    written = train_run(CheckpointStore(store_root), spec, epochs, data)
    out.put(len(written))


def test_processes_sharing_a_local_store_train_a_run_once(tmp_path):
    """Two processes (say two studies, each with its own Ray) ask for the same missing run at
    once: the store's lock lets one train it; the other finds it written and trains nothing."""
    import multiprocessing as mp

    cfg = _cfg(tmp_path, seeds=1)
    spec = pool_specs(cfg)[0]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_train_in_process, args=(cfg.store, spec, [1, 3], out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(out.get() for _ in procs) == [0, 2]
    assert CheckpointStore(cfg.store).stats()["trainings"] == 1


def test_a_pool_trains_first_the_runs_no_one_else_is_training(tmp_path):
    """While another process trains the pool's first PTM (holds its run's lock), a trial that needs
    the same pool trains the second meanwhile, then waits for the first: two trials train a missing
    pool side by side instead of one after the other."""
    import threading
    import time

    cfg = _cfg(tmp_path, seeds=2)
    first, second = pool_specs(cfg)
    store = CheckpointStore(cfg.store)
    data = load_data(cfg.dataset)
    result = {}
    with store.lock(f"train-{first.run_id}"):  # "another process" is training the first run
        worker = threading.Thread(target=lambda: result.update(pool=resolve_pool(cfg, data, DEVICE, progress=False)))
        worker.start()
        deadline = time.monotonic() + 120
        while not store.has(second.key(1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        trained_meanwhile = store.has(second.key(1))
        assert not store.has(first.key(1)) and "pool" not in result  # it waits for the held run
    worker.join(timeout=120)
    assert trained_meanwhile, "the free run was not trained while another run's lock was held"
    pool = result["pool"]
    assert (pool.trainings, pool.hits) == (2, 0) and len(pool.ptms) == 2
    assert [p.key for p in pool.ptms] == [first.key(1), second.key(1)]  # in spec order


def test_clom_needs_the_target_label_space(tmp_path):
    from dataclasses import replace

    spec = {"dataset": {"name": "digits", "im_size": 8, "train_per_class": 10},
            "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 1,
                     "source": {"name": "digits", "im_size": 8, "train_per_class": 10, "classes": [0, 1, 2, 3, 4]}},
            "store": str(tmp_path / "store")}
    with pytest.raises(ConfigError, match="loss.clom: the pool's label space"):  # the config refuses it first
        build_config({**spec, "loss": {"clom": 1.0}})
    # CCLoM only needs embeddings: the same pool works
    ok = build_config({**spec, "loss": {"clom": 0.0, "cclom": 1.0}})
    data = load_data(ok.dataset)
    assert len(resolve_pool(ok, data, DEVICE, progress=False).ptms) == 1
    # and the pool refuses CLoM from the PTMs' own classes, for a config built around the checks
    with pytest.raises(ConfigError, match="loss.clom"):
        resolve_pool(replace(ok, loss=replace(ok.loss, clom=1.0)), data, DEVICE, progress=False)


def test_guide_computes_weighted_clom_and_cclom(tmp_path):
    cfg = _cfg(tmp_path, seeds=1)
    data = load_data(cfg.dataset)
    ptm = resolve_pool(cfg, data, DEVICE, progress=False).ptms[0]
    syn = data.x_train[:10].clone().requires_grad_(True)
    y = data.y_train[:10]
    guide = PTMGuide([ptm], clom=3.0, cclom=0.0, real=data, cclom_batch=16, seed=0)
    expected = 3.0 * losses.clom(ptm.model(syn), y)
    assert guide(syn, syn, y).item() == pytest.approx(expected.item(), rel=1e-5)
    both = PTMGuide([ptm], clom=0.0, cclom={"ConvNetW32": 2.0}, real=data, cclom_batch=16, seed=0)
    value = both(syn, syn, y)
    assert 0.0 < value.item() <= 2.0  # beta * a share of distance in [0, 1]
    value.backward()
    assert syn.grad.abs().sum() > 0
    assert not PTMGuide([ptm], clom=0.0, cclom=0.0, real=data, cclom_batch=16, seed=0)


def test_cclom_reads_its_real_batch_from_features_embedded_once(tmp_path, monkeypatch):
    """The real side of CCLoM is a frozen PTM on unaugmented images: embedding the real set once
    gives the loss of embedding every step's batch (the same draws, the same value), at the cost of
    a gather; past the cache budget every step embeds its batch again."""
    cfg = _cfg(tmp_path, seeds=1)
    data = load_data(cfg.dataset)
    ptm = resolve_pool(cfg, data, DEVICE, progress=False).ptms[0]
    syn, y = data.x_train[:10], data.y_train[:10]
    cached = PTMGuide([ptm], clom=0.0, cclom=5.0, real=data, cclom_batch=64, seed=3)
    steps = [cached(syn, syn, y).item() for _ in range(3)]
    assert len(cached._features) == 1
    gen = torch.Generator().manual_seed(3)
    for value in steps:  # the old way: embed this step's batch
        idx = torch.randint(data.x_train.shape[0], (64,), generator=gen)
        with torch.no_grad():
            real = ptm.model.embed(data.x_train[idx])
        expected = 5.0 * losses.cclom(ptm.model.embed(syn), real, y, data.y_train[idx])
        assert value == pytest.approx(expected.item(), rel=1e-5)
    monkeypatch.setattr(PTMGuide, "FEATURE_CACHE_BYTES", 0)
    uncached = PTMGuide([ptm], clom=0.0, cclom=5.0, real=data, cclom_batch=64, seed=3)
    assert [uncached(syn, syn, y).item() for _ in range(3)] == pytest.approx(steps, rel=1e-5)
    assert not uncached._features


def test_guide_draws_archs_uniformly_then_seeds(tmp_path):
    cfg = build_config({
        "dataset": {"name": "digits", "im_size": 8, "train_per_class": 10},
        "pool": {"archs": ["ConvNetW32", "MLP"], "seeds": [0, 1, 2], "epoch": 1},
        "store": str(tmp_path / "store"),
    })
    data = load_data(cfg.dataset)
    ptms = resolve_pool(cfg, data, DEVICE, progress=False).ptms
    ptms = [p for p in ptms if p.arch == "ConvNetW32" or p.seed == 0]  # 3 ConvNet PTMs, 1 MLP
    seen = []
    for p in ptms:  # record which model is used through a forward hook
        p.model.register_forward_hook(lambda m, i, o, p=p: seen.append(p.arch))
    guide = PTMGuide(ptms, clom=1.0, cclom=0.0, real=data, cclom_batch=8, seed=0)
    syn, y = data.x_train[:10], data.y_train[:10]
    for _ in range(400):
        guide(syn, syn, y)
    share_mlp = seen.count("MLP") / len(seen)
    assert 0.4 < share_mlp < 0.6  # 1 MLP vs 3 ConvNet PTMs, yet archs are drawn 50/50 (not 25/75)


def test_a_run_is_trained_only_as_far_as_asked_and_is_deterministic(tmp_path):
    base = {"dataset": {"name": "digits", "im_size": 8, "train_per_class": 20}, "model": "ConvNetW32",
            "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 1}, "pretrain": {"batch": 64},
            "store": str(tmp_path / "store")}
    cfg = build_config(base)
    assert cfg.pretrain.epochs == 150
    data = load_data(cfg.dataset)
    first = resolve_pool(cfg, data, DEVICE, progress=False).ptms[0]
    store = CheckpointStore(cfg.store)
    assert [k[-5:] for k in store.keys()] == ["e0001"]  # epoch 1 of a 150-epoch run: 1 epoch trained
    longer = build_config({**base, "pretrain": {"batch": 64, "save_epochs": [2]}})
    pool = resolve_pool(longer, data, DEVICE, progress=False)
    assert pool.hits == 1 and pool.trainings == 0  # epoch 1 is there already
    more = build_config({**base, "pool": {**base["pool"], "epoch": 2}, "pretrain": {"batch": 64, "save_epochs": [1]}})
    second = resolve_pool(more, data, DEVICE, progress=False)
    assert second.trainings == 1 and [k[-5:] for k in store.keys()] == ["e0001", "e0002"]
    again = store.load(first.key)  # rewritten by the second run with identical weights
    assert all(torch.equal(again.tensors[k], v.cpu()) for k, v in first.model.state_dict().items())


def test_guide_can_be_told_to_use_the_raw_synthetic_set(tmp_path):
    cfg = _cfg(tmp_path, seeds=1)
    data = load_data(cfg.dataset)
    ptm = resolve_pool(cfg, data, DEVICE, progress=False).ptms[0]
    raw, aug, y = data.x_train[:10], data.x_train[10:20], data.y_train[:10]
    on_aug = PTMGuide([ptm], clom=1.0, cclom=0.0, real=data, cclom_batch=8, seed=0)
    on_raw = PTMGuide([ptm], clom=1.0, cclom=0.0, real=data, cclom_batch=8, seed=0, augmented=False)
    assert on_aug(aug, raw, y).item() == pytest.approx(losses.clom(ptm.model(aug), y).item(), rel=1e-5)
    assert on_raw(aug, raw, y).item() == pytest.approx(losses.clom(ptm.model(raw), y).item(), rel=1e-5)
