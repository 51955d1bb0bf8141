"""The random-real baseline, evaluated once and kept: ``ipc`` random real images per class, trained
on and scored like the distilled set it is compared with (:mod:`ptmdd_ray.evaluate`).

It depends only on the data, ``ipc``, the seed, the evaluation protocol and the device kind (runs
are deterministic given these), never on how the compared set was made: every grid point of a study
that shares a seed would evaluate the same subset the same way. So the first run evaluates it under
a store lock (concurrent trials of one seed wait for it rather than repeat it) and keeps it as a
record in the store (:meth:`~ptmdd_ray.store.CheckpointStore.put_record`); later trials and studies
read it back.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import __version__
from .config import Config, to_dict
from .cost import Meter, Seconds, device_sync
from .data import ImageData
from .sources import canonical_name, source_id
from .evaluate import evaluate_set, random_real_subset
from .store import CheckpointStore, StoreError

log = logging.getLogger(__name__)


@dataclass
class BaselineCost:
    """What the random-real baseline cost a run: the seconds spent waiting for another run
    evaluating it, and its own evaluation's (zero when read back from the store)."""

    wait_seconds: float = 0.0
    evaluation: Seconds = Seconds()


@dataclass
class Scores:
    """A distilled set's accuracies and the random-real baseline's, each {split: {arch: summary}}
    (the baseline {} when ``eval.baseline`` is off), and what the evaluation cost: ``seconds`` in
    all (wall), ``set_cost`` the set's evaluation, ``baseline_cost`` the baseline's."""

    accuracy: dict[str, dict]
    baseline: dict[str, dict]
    baseline_cached: bool  # read back from the store
    baseline_wait_seconds: float  # waiting for another run evaluating the same baseline
    seconds: float
    set_cost: Seconds = Seconds()
    baseline_cost: Seconds = Seconds()


def evaluate_against_baseline(cfg: Config, data: ImageData, images: torch.Tensor, labels: torch.Tensor,
                              progress: bool = True, set_lr: float | None = None) -> Scores:
    """Evaluate a distilled set with ``cfg.eval`` and, with ``eval.baseline``, the random-real
    baseline of ``distill.ipc``. The baseline first: if a concurrent trial of the same seed is
    evaluating it, this one evaluates its own set meanwhile and then reads the baseline back
    instead of idling. ``set_lr``: the set's own learning rate (MTT's learned step size, as the
    reference evaluates it), in place of ``eval.lr`` for the set; the baseline keeps ``eval.lr``."""
    t0 = time.perf_counter()
    acc: dict[str, dict] = {}
    meter = Meter(device_sync(data.x_train.device))

    def evaluate_synthetic() -> None:
        with meter:
            protocol = cfg.eval if set_lr is None else replace(cfg.eval, lr=set_lr)
            acc.update(evaluate_set(images, labels, data, protocol, cfg.seed, progress, "eval synthetic",
                                    precision=cfg.precision))

    spent = BaselineCost()
    baseline, cached = random_real_baseline(cfg, data, cfg.distill.ipc, progress, evaluate_synthetic,
                                            spent=spent) if cfg.eval.baseline else ({}, False)
    if not acc:
        evaluate_synthetic()
    return Scores(acc, baseline, cached, spent.wait_seconds, time.perf_counter() - t0, meter.seconds,
                  spent.evaluation)


def baseline_record(cfg: Config, data: ImageData, ipc: int) -> tuple[str, dict[str, Any]]:
    """The store record name of a random-real baseline and what it identifies: everything the
    evaluation depends on (the source's files, the subset, ipc, seed, protocol, device kind)."""
    dataset = {**to_dict(cfg.dataset), "name": canonical_name(cfg.dataset.name)}
    if not dataset["zca"]:  # added later: records stored before it keep their names
        del dataset["zca"]
    ident = {"data": source_id(cfg.dataset), "dataset": dataset, "ipc": ipc, "seed": cfg.seed,
             "eval": {k: v for k, v in to_dict(cfg.eval).items() if k not in ("baseline", "every")},
             "device": data.x_train.device.type, "precision": cfg.precision, "version": __version__}
    return "baseline-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24], ident


def random_real_baseline(cfg: Config, data: ImageData, ipc: int, progress: bool = True,
                         while_busy: Callable[[], None] | None = None, reuse: bool = True,
                         spent: BaselineCost | None = None) -> tuple[dict, bool]:
    """The random-real baseline of ``ipc`` images per class, evaluated with ``cfg.eval``; returns
    ({split: {arch: summary}}, whether it came from the store). Evaluated once per record (see the
    module docstring). If another process is evaluating it, ``while_busy`` (the caller's other
    work) runs before waiting for it. ``spent`` hears what it cost (the wait, the evaluation). An
    unwritable store only costs the reuse; ``reuse=False`` leaves the store alone."""
    spent = spent if spent is not None else BaselineCost()

    def evaluate() -> dict:
        real_x, real_y = random_real_subset(data, ipc, cfg.seed)
        with Meter(device_sync(data.x_train.device)) as meter:
            out = evaluate_set(real_x, real_y, data, cfg.eval, cfg.seed, progress, "eval random real",
                               precision=cfg.precision)
        spent.evaluation = meter.seconds
        return out

    store = _writable_store(cfg) if reuse else None
    if store is None:
        return evaluate(), False
    name, ident = baseline_record(cfg, data, ipc)
    if while_busy is not None:
        with store.lock(name, wait=False) as free:
            pass
        if not free:
            while_busy()
    t0 = time.perf_counter()
    with store.lock(name):
        spent.wait_seconds = time.perf_counter() - t0
        rec = store.record(name)
        if rec is not None and rec.get("ident") == ident:
            return rec["baseline"], True
        baseline = evaluate()
        store.put_record(name, {"ident": ident, "baseline": baseline})
    return baseline, False


def _writable_store(cfg: Config) -> CheckpointStore | None:
    """``cfg.store`` if baselines can be kept there, else None (warned: only the reuse is lost)."""
    try:
        store = CheckpointStore(cfg.store)
        store.check_writable()
    except StoreError as e:
        log.warning("%s; the random-real baseline is evaluated without reuse", e)
        return None
    return store
