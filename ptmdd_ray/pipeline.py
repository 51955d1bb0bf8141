"""End-to-end jobs on one :class:`~ptmdd_ray.config.Config`: pretrain the pool if needed, distill,
evaluate against the random-real baseline, write the artifacts. The CLI and (later) Ray Tune trials
call these; they do no argument parsing and no printing.

Every check that needs the data (IPC vs class sizes, PTM compatibility) runs before anything is
written, and the output directory is only populated at the very end, file by atomic file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from . import __version__, artifacts
from .config import Config, ConfigError, source_dataset, to_dict, uses_ptms, weight_for
from .data import ImageData, load_data
from .sources import source_id
from .evaluate import evaluate_set, random_real_subset
from .methods import DistillState, distill
from .pool import PTM_DATA_SEED, PTM, PTMGuide, PTMRepository, check_compatible, load_ptm, pool_specs, save_epochs
from .store import CheckpointStore, StoreError

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but CUDA is not available")
    return torch.device(name)


def check_ipc(data: ImageData, ipc: int, key: str = "distill.ipc") -> None:
    counts = [int(i.numel()) for i in data.class_indices()]
    smallest = min(counts)
    if ipc > smallest:
        c = counts.index(smallest)
        if data.has_val:  # the hold-out is what took them
            held = int((data.y_val == c).sum())
            raise ConfigError(f"dataset.val_per_class: {held} held out of class {data.classes[c]!r}'s "
                              f"{smallest + held} training images leaves {smallest}, fewer than {key} {ipc}")
        raise ConfigError(f"{key}: {ipc} images per class requested but class {data.classes[c]!r} "
                          f"has only {smallest} training images")


@dataclass
class Pool:
    ptms: list[PTM]
    trainings: int
    hits: int

    def manifest(self) -> list[dict[str, Any]]:
        return [{"id": p.key, "arch": p.arch, "seed": p.seed, "epoch": p.epoch,
                 "test_accuracy": p.test_accuracy, "train_accuracy": p.train_accuracy} for p in self.ptms]


def resolve_pool(cfg: Config, target: ImageData, device: torch.device, progress: bool = True,
                 repo: PTMRepository | None = None, idle: bool = False) -> Pool:
    """Load the pool's PTMs from the store, training the missing ones on ``pool.source``. A pool
    whose weights are all zero is idle and is not resolved (the plain method) unless ``idle``."""
    if not cfg.pool.archs or not (idle or uses_ptms(cfg)):
        return Pool([], 0, 0)
    repo = repo or PTMRepository(CheckpointStore(cfg.store), progress)
    src_cfg = source_dataset(cfg)
    cache: dict[str, ImageData] = {}

    def load_source() -> ImageData:
        # A PTM's training data is a function of its spec alone (never of this run's seed), so a
        # stored checkpoint means the same model whichever run trained it.
        if "src" not in cache:
            same = src_cfg == cfg.dataset and (cfg.seed == PTM_DATA_SEED or not src_cfg.train_per_class)
            cache["src"] = target if same else load_data(src_cfg, PTM_DATA_SEED).to(device)
        return cache["src"]

    needs_labels = any(weight_for(cfg.loss.clom, a) > 0 for a in cfg.pool.archs)
    hits0, trainings0 = repo.hits, repo.trainings
    ptms = []
    for spec in pool_specs(cfg):
        ckpt = repo.get(spec, cfg.pool.epoch, save_epochs(cfg), load_source)
        check_compatible(tuple(ckpt.meta["shape"]), ckpt.meta["classes"], target, needs_labels)
        ptms.append(load_ptm(ckpt, device))
    return Pool(ptms, repo.trainings - trainings0, repo.hits - hits0)


class Checkpoints(Protocol):
    """Where a run keeps its distillation state along the way, every ``every`` iterations, to go
    on from it after a crash (a study trial: Tune's checkpoints). ``extra``: the pipeline's own
    history (intermediate evaluations)."""
    every: int

    def load(self) -> tuple[DistillState, dict[str, Any]] | None: ...

    def save(self, state: DistillState, extra: dict[str, Any]) -> None: ...


def run_distill(cfg: Config, out: str | Path | None = None, progress: bool = True,
                on_log: Callable[[int, float], None] | None = None, repo=None,
                data: ImageData | None = None, on_eval: Callable[[int, float], None] | None = None,
                checkpoints: Checkpoints | None = None) -> dict[str, Any]:
    """Pretrain-if-needed, distill, evaluate; write ``result.json``, ``synthetic.parquet`` and
    ``synthetic.png`` into ``out`` (if given). Returns the result mapping. ``repo`` serves the
    pool (default: a local :class:`~ptmdd_ray.pool.PTMRepository` on ``cfg.store``); ``data`` is
    ``cfg.dataset`` already loaded (a study shares one copy between its trials). With
    ``eval.every`` > 0 the set is also evaluated along the way (one run per arch, no baseline) and
    ``on_eval(iteration, mean accuracy)`` hears each result: a Tune scheduler prunes on these.
    With ``checkpoints`` the distillation goes on from the last saved state, if any, and saves its
    state along the way."""
    device = pick_device(cfg.device)
    data = data if data is not None else load_data(cfg.dataset, cfg.seed)
    check_ipc(data, cfg.distill.ipc)
    data = data.to(device)

    t0 = time.perf_counter()
    pool = resolve_pool(cfg, data, device, progress, repo=repo)
    pool_seconds = time.perf_counter() - t0
    guide = PTMGuide.from_config(cfg.loss, pool.ptms, data, cfg.seed)
    guide_seconds = time.perf_counter() - t0 - pool_seconds

    resume, extra = (checkpoints.load() if checkpoints else None) or (None, {})
    eval_history: list[tuple[int, float]] = [(int(i), float(a)) for i, a in extra.get("eval_history", [])]
    quick = replace(cfg.eval, runs=1)
    amp = cfg.precision == "bf16"
    along = intermediate_split(data)

    def intermediate(it: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        acc = evaluate_set(images, labels, data, quick, cfg.seed, False, splits=(along,), mixed_precision=amp)[along]
        mean = sum(a["mean"] for a in acc.values()) / len(acc)
        eval_history.append((it, mean))
        if on_eval is not None:
            on_eval(it, mean)

    def save_state(state: DistillState) -> None:
        checkpoints.save(state, {"eval_history": eval_history})

    syn = distill(cfg.distill, cfg.model, data, cfg.seed, guide or None, progress, on_log,
                  cfg.eval.every, intermediate, resume=resume, state_every=checkpoints.every if checkpoints else 0,
                  on_state=save_state if checkpoints else None)

    t1 = time.perf_counter()
    acc: dict[str, dict] = {}

    def evaluate_synthetic() -> None:
        acc.update(evaluate_set(syn.images, syn.labels, data, cfg.eval, cfg.seed, progress, "eval synthetic",
                                mixed_precision=amp))

    # the baseline first: if a concurrent trial of the same seed is evaluating it, this one
    # evaluates its own set meanwhile and then reads the baseline back instead of idling
    waits: dict[str, float] = {}
    baseline, baseline_cached = random_real_baseline(cfg, data, cfg.distill.ipc, progress, evaluate_synthetic,
                                                     waits=waits) if cfg.eval.baseline else ({}, False)
    if not acc:
        evaluate_synthetic()
    eval_seconds = time.perf_counter() - t1

    result = {
        "version": __version__,
        "config": to_dict(cfg),
        "accuracy": acc["test"],
        "baseline_random": baseline.get("test"),
        "val_accuracy": acc.get("val"),
        "baseline_random_val": baseline.get("val"),
        "eval_split": along,  # the split of eval_history
        "pool": pool.manifest(),
        "pool_stats": {"trainings": pool.trainings, "hits": pool.hits, "seconds": pool_seconds},
        "timing": {"distill_seconds": syn.seconds, "iterations": syn.iterations,
                   "seconds_per_iteration": syn.seconds / max(1, syn.iterations), "eval_seconds": eval_seconds,
                   "baseline_cached": baseline_cached, "resumed_from": resume.iteration if resume else 0,
                   "baseline_wait_seconds": waits.get("lock", 0.0), "guide_seconds": guide_seconds},
        "loss_history": syn.loss_history,
        "eval_history": eval_history,
        "device": str(device),
        "synthetic": "synthetic.parquet",
        "image": "synthetic.png",
    }
    if out is not None:
        write_outputs(Path(out), result, syn.images, syn.labels, data, cfg)
    return result


def intermediate_split(data: ImageData) -> str:
    """Where the evaluations along the way (``eval.every``, what a scheduler prunes on) are scored:
    validation when the data hold it out, else test (then they are a curve to look at, and
    :func:`ptmdd_ray.study.run_study` refuses to prune on them)."""
    return "val" if data.has_val else "test"


def synthetic_meta(cfg: Config, data: ImageData) -> dict[str, Any]:
    return {"config": to_dict(cfg), "mean": list(data.mean), "std": list(data.std), "classes": data.classes}


def write_outputs(out: Path, result: dict, images: torch.Tensor, labels: torch.Tensor, data: ImageData,
                  cfg: Config) -> None:
    artifacts.write_synthetic(out / "synthetic.parquet", images, labels, synthetic_meta(cfg, data))
    artifacts.write_atomic(out / "synthetic.png",
                           artifacts.grid_png(data.denormalize(images.to(data.x_train.device)).cpu(), labels,
                                              data.num_classes))
    artifacts.write_json(out / "result.json", result)  # last: its presence marks a complete run


def run_pretrain(cfg: Config, progress: bool = True) -> Pool:
    """Build or extend the pool of ``cfg`` in the store (no distillation)."""
    device = pick_device(cfg.device)
    src = load_data(source_dataset(cfg), PTM_DATA_SEED).to(device)
    return resolve_pool(cfg, src, device, progress, idle=True)


def run_evaluate(cfg: Config, images: torch.Tensor, labels: torch.Tensor, progress: bool = True) -> dict[str, Any]:
    """Evaluate a saved synthetic set on ``cfg.dataset`` with ``cfg.eval``."""
    device = pick_device(cfg.device)
    data = load_data(cfg.dataset, cfg.seed)
    shape = list(images.shape[1:])
    if shape != [data.channels, data.im_size, data.im_size]:
        raise ConfigError(f"dataset: synthetic images are {shape}, the dataset gives "
                          f"{[data.channels, data.im_size, data.im_size]}")
    if int(labels.max()) >= data.num_classes:
        raise ConfigError(f"dataset: synthetic labels go up to {int(labels.max())}, the dataset has "
                          f"{data.num_classes} classes")
    data = data.to(device)
    ipc = int(torch.bincount(labels).max())
    acc = evaluate_set(images, labels, data, cfg.eval, cfg.seed, progress, "eval synthetic",
                       mixed_precision=cfg.precision == "bf16")
    out = {"config": to_dict(cfg), "accuracy": acc["test"], "baseline_random": None, "val_accuracy": acc.get("val"),
           "baseline_random_val": None, "ipc": ipc}
    if cfg.eval.baseline:
        check_ipc(data, ipc, "synthetic")
        base, _ = random_real_baseline(cfg, data, ipc, progress, reuse=False)
        out["baseline_random"], out["baseline_random_val"] = base["test"], base.get("val")
    return out


def baseline_record(cfg: Config, data: ImageData, ipc: int) -> tuple[str, dict[str, Any]]:
    """The store record name of a random-real baseline and what it identifies: everything the
    evaluation depends on (the source's files, the subset, ipc, seed, protocol, device kind)."""
    ident = {"data": source_id(cfg.dataset), "dataset": to_dict(cfg.dataset), "ipc": ipc, "seed": cfg.seed,
             "eval": {k: v for k, v in to_dict(cfg.eval).items() if k not in ("baseline", "every")},
             "device": data.x_train.device.type, "precision": cfg.precision, "version": __version__}
    return "baseline-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24], ident


def random_real_baseline(cfg: Config, data: ImageData, ipc: int, progress: bool = True,
                         while_busy: Callable[[], None] | None = None, reuse: bool = True,
                         waits: dict[str, float] | None = None) -> tuple[dict, bool]:
    """The random-real baseline of ``ipc`` images per class, evaluated with ``cfg.eval``; returns
    ({split: {arch: summary}}, whether it came from the store). It depends only on the data, ``ipc``, the seed, the
    evaluation protocol and the device kind (runs are deterministic given these), not on how the set
    it is compared with was made: every grid point of a study that shares a seed would evaluate the
    same subset the same way. So it is evaluated once, under a store lock (concurrent trials of one
    seed wait for it rather than repeat it), and kept as a record in the store for later trials and
    studies. If another process is evaluating it, ``while_busy`` (the caller's other work) runs
    before waiting for it (``waits["lock"]``: the seconds then spent waiting). An unwritable store
    only costs the reuse; ``reuse=False`` leaves the store alone."""
    def evaluate() -> dict:
        real_x, real_y = random_real_subset(data, ipc, cfg.seed)
        return evaluate_set(real_x, real_y, data, cfg.eval, cfg.seed, progress, "eval random real",
                            mixed_precision=cfg.precision == "bf16")

    if not reuse:
        return evaluate(), False
    try:
        store = CheckpointStore(cfg.store)
        store.check_writable()
    except StoreError as e:
        log.warning("%s; the random-real baseline is evaluated without reuse", e)
        return evaluate(), False
    name, ident = baseline_record(cfg, data, ipc)
    if while_busy is not None:
        with store.lock(name, wait=False) as free:
            pass
        if not free:
            while_busy()
    t0 = time.perf_counter()
    with store.lock(name):
        if waits is not None:
            waits["lock"] = time.perf_counter() - t0
        rec = store.record(name)
        if rec is not None and rec.get("ident") == ident:
            return rec["baseline"], True
        baseline = evaluate()
        store.put_record(name, {"ident": ident, "baseline": baseline})
    return baseline, False
