"""The pipeline's reuse of the random-real baseline: evaluated once per (data, ipc, seed, eval
protocol), read back by every later run that shares them, never by one that does not."""
import threading
import time

import pytest
import torch

from ptmdd_ray.config import ConfigError, load_config
from ptmdd_ray.data import load_data
from ptmdd_ray.baseline import baseline_record, random_real_baseline
from ptmdd_ray.pipeline import run_distill
from ptmdd_ray.store import CheckpointStore

TINY = ["dataset.name=digits", "model=ConvNetW32", "distill.ipc=1", "distill.iterations=3", "distill.batch_real=16",
        "eval.runs=1", "eval.epochs=3", "loss.clom=0.0", "loss.cclom=0.0"]


def _cfg(tmp_path, *extra):
    return load_config(overrides=[*TINY, f"store={tmp_path / 'store'}", *extra])


def _records(tmp_path):
    return sorted(p.name for p in (tmp_path / "store" / "records").glob("*.json"))


def test_runs_sharing_a_seed_evaluate_the_random_real_baseline_once(tmp_path):
    first = run_distill(_cfg(tmp_path), progress=False)
    assert first["timing"]["baseline_cached"] is False and len(_records(tmp_path)) == 1
    # another grid point of the same seed (more iterations, another lr_img): the baseline is read back
    other = run_distill(_cfg(tmp_path, "distill.iterations=5", "distill.lr_img=0.5"), progress=False)
    assert other["timing"]["baseline_cached"] is True
    assert other["baseline_random"] == first["baseline_random"]
    assert len(_records(tmp_path)) == 1
    # what changes the baseline makes a record of its own: the seed, the IPC, the evaluation protocol
    for change in ("seed=1", "distill.ipc=2", "eval.epochs=4"):
        again = run_distill(_cfg(tmp_path, change), progress=False)
        assert again["timing"]["baseline_cached"] is False, change
    assert len(_records(tmp_path)) == 4


def test_a_cached_baseline_equals_a_fresh_evaluation(tmp_path):
    """Reuse is only sound because the baseline is a function of what the key holds: evaluate it
    without the store and compare."""
    cfg = _cfg(tmp_path)
    data = load_data(cfg.dataset, cfg.seed)
    fresh, cached = random_real_baseline(cfg, data, 1, progress=False, reuse=False)
    assert cached is False and not (tmp_path / "store").exists()  # reuse=False leaves the store alone
    stored, _ = random_real_baseline(cfg, data, 1, progress=False)
    read, cached = random_real_baseline(cfg, data, 1, progress=False)
    assert cached is True and fresh == stored == read


def test_concurrent_runs_of_one_seed_evaluate_the_baseline_once(tmp_path):
    cfg = _cfg(tmp_path)
    data = load_data(cfg.dataset, cfg.seed)
    out = []
    threads = [threading.Thread(target=lambda: out.append(random_real_baseline(cfg, data, 1, progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(cached for _, cached in out) == [False, True]  # the second waited on the lock
    assert out[0][0] == out[1][0]


def test_a_damaged_record_is_evaluated_again_and_an_unusable_store_only_costs_the_reuse(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    data = load_data(cfg.dataset, cfg.seed)
    good, _ = random_real_baseline(cfg, data, 1, progress=False)
    (record,) = (tmp_path / "store" / "records").glob("*.json")
    record.write_text('{"ident": ')  # truncated by hand
    again, cached = random_real_baseline(cfg, data, 1, progress=False)
    assert cached is False and again == good
    assert CheckpointStore(tmp_path / "store").record(record.stem)["baseline"] == good  # rewritten whole

    (tmp_path / "not_a_dir").write_text("")
    blocked = _cfg(tmp_path, f"store={tmp_path / 'not_a_dir' / 'store'}")
    base, cached = random_real_baseline(blocked, data, 1, progress=False)
    assert cached is False and base == good
    assert "not writable" in caplog.text and "without reuse" in caplog.text


def test_a_run_whose_baseline_is_being_evaluated_elsewhere_does_its_own_work_meanwhile(tmp_path):
    cfg = _cfg(tmp_path)
    data = load_data(cfg.dataset, cfg.seed)
    name, _ = baseline_record(cfg, data, 1)
    calls, out = [], []
    with CheckpointStore(tmp_path / "store").lock(name):  # another trial of this seed is on it
        t = threading.Thread(target=lambda: out.append(
            random_real_baseline(cfg, data, 1, False, while_busy=lambda: calls.append("own set"))))
        t.start()
        end = time.time() + 60
        while not calls and time.time() < end:
            time.sleep(0.05)
        assert calls == ["own set"] and t.is_alive() and not out  # its own work done, now it waits
    t.join(120)
    assert out and out[0][1] is False  # the holder wrote nothing: it evaluated the baseline itself
    random_real_baseline(cfg, data, 1, False, while_busy=lambda: calls.append("again"))
    assert calls == ["own set"]  # a free record: nothing to do meanwhile


def test_the_order_of_evaluation_does_not_change_the_synthetic_sets_accuracy(tmp_path):
    """run_distill evaluates the baseline first (or the set first while another run holds the
    baseline): the set's accuracy is the same with the baseline, without it, and read back."""
    with_base = run_distill(_cfg(tmp_path), progress=False)
    without = run_distill(_cfg(tmp_path, "eval.baseline=false"), progress=False)
    read_back = run_distill(_cfg(tmp_path), progress=False)
    assert read_back["timing"]["baseline_cached"] is True and without["baseline_random"] is None
    assert with_base["accuracy"] == without["accuracy"] == read_back["accuracy"]


def test_nothing_the_run_trains_on_reads_the_validation_images(tmp_path):
    """A canary: the validation images are NaN. PTM pretraining (on the target's own data),
    the real batches of matching, CCLoM's real batch, the initial set and the random-real baseline
    would all carry a NaN into their losses, weights or images if they read one; only scoring does."""
    import math

    import torch

    from ptmdd_ray.tracking import metrics_of

    cfg = _cfg(tmp_path, "dataset.val_per_class=15", "pool.archs=[ConvNetW32]", "pool.epoch=2", "pretrain.epochs=2",
               "loss.clom=1.0", "loss.cclom=1.0", "loss.cclom_batch=64", "distill.iterations=4", "eval.epochs=40")
    data = load_data(cfg.dataset, cfg.seed)
    data.x_val = torch.full_like(data.x_val, float("nan"))
    result = run_distill(cfg, tmp_path / "out", progress=False, data=data)
    assert result["pool_stats"]["trainings"] == 1
    (ptm,) = result["pool"]
    assert ptm["train_accuracy"] > 0.3 and ptm["test_accuracy"] > 0.3  # trained on clean images only
    assert all(math.isfinite(loss) for _, loss in result["loss_history"])
    from ptmdd_ray.artifacts import read_synthetic
    images, _, _ = read_synthetic(tmp_path / "out" / "synthetic.parquet")
    assert torch.isfinite(images).all()
    for key in ("accuracy", "baseline_random"):  # trained on clean images, scored on clean test images
        assert result[key]["ConvNetW32"]["mean"] > 0.15, key
    assert set(result["val_accuracy"]) == set(result["baseline_random_val"]) == {"ConvNetW32"}
    m = metrics_of(result)
    assert {"val.acc.mean", "val.acc.ConvNetW32.mean", "val.baseline.random.mean"} <= set(m)


def test_a_validation_split_that_leaves_fewer_than_ipc_images_names_val_per_class(tmp_path):
    from ptmdd_ray.config import ConfigError
    import pytest

    cfg = _cfg(tmp_path, "dataset.val_per_class=135", "distill.ipc=5")
    with pytest.raises(ConfigError, match=r"dataset.val_per_class: 135 held out .* fewer than distill.ipc 5"):
        run_distill(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_more_than_the_device_has_is_bad_input_and_more_than_it_has_free_is_transient():
    """MTT's memory check (issue 26): a run that can never fit is a ConfigError (exit 2, and a study
    records it for good); one that only meets memory other processes hold now is a MemoryShortError,
    which a study's trial retries (a neighbour's peak once failed an MTT trial for good)."""
    from ptmdd_ray.errors import MemoryShortError
    from ptmdd_ray.pipeline import check_fits, device_memory_mb

    kw = {"device_type": "cpu", "what": "distill.syn_steps: need ~4.0 GiB", "hint": "lower distill.syn_steps"}
    check_fits(4096, 5000, 8000, **kw)  # fits
    check_fits(4096, None, None, **kw)  # nothing known (off Linux): not refused
    with pytest.raises(ConfigError, match=r"^distill.syn_steps: need ~4.0 GiB, more than the 3.0 GiB this cpu has; "
                                          r"lower distill.syn_steps$"):
        check_fits(4096, 1000, 3072, **kw)
    with pytest.raises(MemoryShortError, match=r"^distill.syn_steps: need ~4.0 GiB, more than the 2.0 GiB free on "
                                               r"cpu now \(other processes hold the rest\); lower distill.syn_steps$"):
        check_fits(4096, 2048, 8000, **kw)
    assert not issubclass(MemoryShortError, ConfigError)
    free, total = device_memory_mb(torch.device("cpu"))
    assert 0 < free <= total  # this machine's /proc/meminfo


class _Interrupted(Exception):
    pass


class _MemoryCheckpoints:
    """A run's checkpoints in memory (:class:`ptmdd_ray.pipeline.Checkpoints`); with ``crash``,
    the run stops right after its first save, as a killed worker would."""

    def __init__(self, every: int, crash: bool):
        self.every, self.saved, self.crash = every, None, crash

    def load(self):
        return self.saved

    def save(self, state, extra):
        self.saved = (state, extra)
        if self.crash:
            raise _Interrupted


def test_a_resumed_runs_distillation_cost_counts_the_attempts_before_it(tmp_path):
    """A trial that went on from a checkpoint reports what its whole distillation cost (the
    earlier attempt's seconds up to its checkpoint, which the checkpoint carries, plus its own),
    not the last attempt's alone: 30 of 40 iterations ran before the crash, so the resumed run's
    cost exceeds the checkpoint's."""
    cfg = _cfg(tmp_path, "distill.iterations=40", "distill.ipc=2")
    ckpts = _MemoryCheckpoints(every=30, crash=True)
    with pytest.raises(_Interrupted):
        run_distill(cfg, progress=False, checkpoints=ckpts)
    state, extra = ckpts.saved
    before = extra["cost"]
    assert state.iteration == 30 and before["wall_s"] > 0 and before["cpu_s"] > 0
    ckpts.crash = False
    resumed = run_distill(cfg, progress=False, checkpoints=ckpts)
    assert resumed["timing"]["resumed_from"] == 30
    spent = resumed["cost"]["distill"]
    assert spent["wall_s"] > before["wall_s"] and spent["cpu_s"] > before["cpu_s"]
