"""What must hold: one small checker per config section, and :func:`resolve`, which runs them in
the order a config file reads and fills in the method's published defaults.

A checker raises a one-line :class:`ConfigError` that starts with the dotted key
(``eval.runs: must be >= 1, got 0``). The domain facts they need come from torch-free modules:
data sets from :mod:`ptmdd_ray.sources`, architecture names from :mod:`ptmdd_ray.archs`, the
methods' tables from :mod:`._methods`. So a bad config fails in milliseconds, before torch loads.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ..archs import is_known
from ..errors import ConfigError, check
from ..sources import canonical_name, check_dataset_config, image_shape, parse_name
from ._methods import (COMPILE_AUTO_EVAL_EPOCHS, COMPILE_AUTO_ITERATIONS, COMPILED_METHODS, METHOD_DEFAULTS,
                       check_strategy, loops_for_ipc, mtt_for_ipc, mtt_table_for)
from ._sections import (INITS, METHODS, MTT_GRADIENTS, PRECISIONS, SCHEDULES, Config, DatasetConfig, DistillConfig,
                        EvalConfig, LossConfig, PoolConfig, PretrainConfig, mtt_reach, source_dataset, weight_for)


def resolve(cfg: Config) -> Config:
    """Validate every section and fill the method defaults. Raises :class:`ConfigError` naming the key."""
    distill = check_distill(cfg.distill, cfg.dataset)
    check_model(cfg.model, "model")
    check_dataset(cfg.dataset, "dataset")
    pool = check_pool(cfg)
    check_pretrain(cfg.pretrain, pool.epoch)
    check_experts(cfg, distill, pool)
    loss = check_loss(cfg.loss, pool.archs, distill.method)
    check_label_space(cfg, pool, loss)
    evaluation = check_eval(cfg.eval, cfg.model, distill.method)
    check_device(cfg.device, cfg.precision)
    check(bool(cfg.store), "store", "must not be empty")
    return replace(cfg, distill=distill, pool=pool, loss=loss, eval=evaluation)


# --------------------------------------------------------------------------- shared rules

def _at_least(section: Any, prefix: str, low: int, names: tuple[str, ...], note: str = "") -> None:
    """Counts: each of ``names`` is at least ``low`` (None: a default comes later)."""
    for name in names:
        value = getattr(section, name)
        check(value is None or value >= low, f"{prefix}.{name}", f"must be >= {low}{note}, got {value}")


def _non_negative(value: float | None, key: str) -> None:
    """Rates, momenta, decays and loss weights: a finite number >= 0 (None: a default comes later)."""
    check(value is None or (math.isfinite(value) and value >= 0), key, f"must be a finite number >= 0, got {value}")


def _rates(section: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        _non_negative(getattr(section, name), f"{prefix}.{name}")


def _weights(weight: float | dict[str, float], key: str, archs: list[str]) -> None:
    """A loss weight: one number, or {arch: number} over archs of the pool."""
    if not isinstance(weight, dict):
        return _non_negative(weight, key)
    for arch, value in weight.items():
        _non_negative(value, f"{key}.{arch}")
        check(arch in archs, f"{key}.{arch}", f"{arch!r} is not in pool.archs {archs}")


# --------------------------------------------------------------------------- sections

def check_model(name: str, key: str) -> None:
    """An architecture name that :func:`ptmdd_ray.models.build_model` accepts."""
    check(is_known(name), key, f"unknown architecture {name!r}")


def check_dataset(ds: DatasetConfig, key: str) -> None:
    """A data set that can be read, with sensible shape and subset options; nothing is decoded."""
    check_dataset_config(ds, key)


def check_distill(distill: DistillConfig, dataset: DatasetConfig | None = None) -> DistillConfig:
    """The method, its counts and rates; fills the method's published defaults (MTT's: those of
    ``dataset``, CIFAR-10's when None) and DC's loop table."""
    method = distill.method
    check(method in METHODS, "distill.method", f"unknown method {method!r} (known: {', '.join(METHODS)})")
    defaults = METHOD_DEFAULTS[method]
    _at_least(distill, "distill", 1, ("ipc",))
    _at_least(distill, "distill", 0, ("iterations",))
    _at_least(distill, "distill", 1, ("outer_loop", "inner_loop", "batch_real", "batch_train", "log_every"))
    _at_least(distill, "distill", 0, ("checkpoint_every",))
    _at_least(distill, "distill", 1, ("syn_steps", "expert_epochs", "max_start_epoch", "batch_syn"))
    _rates(distill, "distill", ("lr_img", "lr_net", "momentum_img", "lr_lr", "lr_teacher"))
    check(distill.mtt_gradient in MTT_GRADIENTS, "distill.mtt_gradient",
          f"expected one of {', '.join(MTT_GRADIENTS)}, got {distill.mtt_gradient!r}")
    init = distill.init or defaults["init"]
    check(init in INITS, "distill.init", f"unknown init {init!r} (known: {', '.join(INITS)})")
    strategy = distill.dsa_strategy or defaults["dsa_strategy"]
    try:
        check_strategy(strategy)
    except ValueError as e:
        raise ConfigError(f"distill.dsa_strategy: {e}") from None
    outer, inner = loops_for_ipc(distill.ipc)
    iterations = defaults["iterations"] if distill.iterations is None else distill.iterations
    compile_ = distill.compile
    if compile_ is None:  # worth its compilation time on long runs only
        compile_ = method in COMPILED_METHODS and iterations >= COMPILE_AUTO_ITERATIONS
    # a study trial's checkpoints: about ten per run unless set (resolved here, so MLflow records it)
    every = distill.checkpoint_every or max(1, iterations // 10)
    if method == "mtt":
        distill = _mtt_defaults(distill, dataset)
    return replace(distill, iterations=iterations, init=init, dsa_strategy=strategy, compile=compile_,
                   checkpoint_every=every, lr_img=defaults["lr_img"] if distill.lr_img is None else distill.lr_img,
                   outer_loop=distill.outer_loop or outer, inner_loop=distill.inner_loop or inner)


_MTT_FIELDS = ("syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "lr_teacher", "batch_syn")


def _mtt_defaults(distill: DistillConfig, dataset: DatasetConfig | None) -> DistillConfig:
    """MTT's unset settings from its published table for the data set and IPC (:func:`mtt_for_ipc`;
    data sets MTT never published take CIFAR-10's rows); ``batch_syn`` None is the whole set."""
    kind = parse_name(dataset.name, "dataset")[0] if dataset is not None else "cifar10"
    table = mtt_for_ipc(distill.ipc, mtt_table_for(kind))
    filled = {k: table[k] if getattr(distill, k) is None else getattr(distill, k) for k in _MTT_FIELDS}
    return replace(distill, **filled)


def check_experts(cfg: Config, distill: DistillConfig, pool: PoolConfig) -> None:
    """MTT's experts are the pool's PTMs of the student's architecture (the pool's other
    architectures guide through CLoM/CCLoM, as for DC/DSA/DM), trained (pretrain.epochs) at least as
    far as the latest segment reaches, max_start_epoch - 1 + expert_epochs."""
    if distill.method != "mtt":
        return
    check(cfg.model in pool.archs, "pool.archs", f"MTT needs expert trajectories of the student's architecture: "
          f"add {cfg.model} (model) to {pool.archs}")
    check(not distill.compile, "distill.compile", "MTT has no compiled path (its unrolled student steps run "
          "eagerly): leave it unset or false")
    source, target = pool.source, cfg.dataset
    if source is not None:  # an expert's parameters live in the student's input and label space
        check(canonical_name(source.name) == canonical_name(target.name) and source.classes == target.classes
              and source.domain == target.domain, "pool.source", f"MTT's experts must train on the target's "
              f"images and labels ({target.name}, classes {target.classes or 'all'}, domain {target.domain})")
        check(source.zca == target.zca, "pool.source.zca", f"{source.zca} but dataset.zca is {target.zca}: "
              "experts and student must see the same whitening")
    reach, epochs = mtt_reach(distill), cfg.pretrain.epochs
    key = "distill.expert_epochs" if distill.expert_epochs > epochs else "distill.max_start_epoch"
    check(reach <= epochs, key, f"segments reach epoch {reach} (max_start_epoch - 1 + expert_epochs) but the "
          f"experts' runs keep {epochs} (pretrain.epochs)")


def check_pool(cfg: Config) -> PoolConfig:
    """Distinct known archs, distinct seeds (a count n becomes 0..n-1), an epoch, and a source data
    set (made a full mapping) that holds out at least the target's validation images."""
    pool, target = cfg.pool, cfg.dataset
    for i, arch in enumerate(pool.archs):
        check_model(arch, f"pool.archs[{i}]")
    check(len(set(pool.archs)) == len(pool.archs), "pool.archs", "duplicate architecture")
    seeds = list(range(pool.seeds)) if isinstance(pool.seeds, int) else list(pool.seeds)
    check(len(seeds) >= 1 and (not isinstance(pool.seeds, int) or pool.seeds >= 1), "pool.seeds",
          f"must be >= 1, got {pool.seeds}")
    check(len(set(seeds)) == len(seeds), "pool.seeds", "duplicate seed")
    _at_least(pool, "pool", 1, ("epoch",))
    if pool.source is None:
        return replace(pool, seeds=seeds)
    source = source_dataset(cfg)
    check_dataset(source, "pool.source")
    if canonical_name(source.name) != canonical_name(target.name):
        source = _sized_like_target(source, target)
    check(source.name != target.name or source.val_per_class >= target.val_per_class, "pool.source.val_per_class",
          f"{source.val_per_class} is below dataset.val_per_class {target.val_per_class}: "
          "the PTMs read the same files and would train on validation images")
    return replace(pool, seeds=seeds, source=source)


def _sized_like_target(source: DatasetConfig, target: DatasetConfig) -> DatasetConfig:
    """A pool source from another data set must give PTMs the target's input: the same channels,
    and its images resized to the target's side (what ``im_size`` left unset means for it)."""
    (tc, ts), (sc, ss) = image_shape(target, "dataset"), image_shape(source, "pool.source")
    check(sc == tc, "pool.source", f"{source.name} images have {sc} channel(s), the target's {tc}: "
          "a PTM must take the target's images")
    if source.im_size is None:
        return source if ss == ts else replace(source, im_size=ts)
    check(ss == ts, "pool.source.im_size", f"{ss}px does not match the target's {ts}px")
    return source


def check_label_space(cfg: Config, pool: PoolConfig, loss: LossConfig) -> None:
    """CLoM scores the synthetic images with the PTM's own classifier, so it needs the target's
    labels: a pool from another data set or class subset is for CCLoM only."""
    if pool.source is None or not any(weight_for(loss.clom, a) > 0 for a in pool.archs):
        return
    source, target = pool.source, cfg.dataset
    same = canonical_name(source.name) == canonical_name(target.name) and source.classes == target.classes
    check(same, "loss.clom", f"the pool's label space ({source.name}, classes {source.classes or 'all'}) differs "
          f"from the target's ({target.name}, classes {target.classes or 'all'}): use loss.cclom for PTMs "
          "from another label space")


def check_pretrain(pretrain: PretrainConfig, pool_epoch: int) -> None:
    """A run long enough for the pool's epoch, checkpoints within it, and its optimiser settings."""
    epochs = pretrain.epochs
    _at_least(pretrain, "pretrain", 1, ("epochs",))
    check(pool_epoch <= epochs, "pool.epoch", f"{pool_epoch} is past pretrain.epochs {epochs}")
    for i, epoch in enumerate(pretrain.save_epochs):
        check(0 <= epoch <= epochs, f"pretrain.save_epochs[{i}]", f"must be in 0..{epochs}, got {epoch}")
    _rates(pretrain, "pretrain", ("lr", "momentum", "weight_decay"))
    try:
        check_strategy(pretrain.dsa_strategy)
    except ValueError as e:
        raise ConfigError(f"pretrain.dsa_strategy: {e}") from None
    check(pretrain.schedule in SCHEDULES, "pretrain.schedule",
          f"expected one of {', '.join(SCHEDULES)}, got {pretrain.schedule!r}")
    _at_least(pretrain, "pretrain", 1, ("batch",))


def check_loss(loss: LossConfig, archs: list[str], method: str) -> LossConfig:
    """CLoM/CCLoM weights over the pool's archs; ``clom`` defaults per method with a pool, else 0."""
    clom = loss.clom if loss.clom is not None else (METHOD_DEFAULTS[method]["clom"] if archs else 0.0)
    _weights(clom, "loss.clom", archs)
    _weights(loss.cclom, "loss.cclom", archs)
    _at_least(loss, "loss", 1, ("cclom_batch",))
    if not archs:
        check(not any(not isinstance(w, dict) and w > 0 for w in (clom, loss.cclom)), "loss",
              "clom/cclom > 0 needs a non-empty pool.archs")
    return replace(loss, clom=clom)


def check_eval(evaluation: EvalConfig, model: str, method: str) -> EvalConfig:
    """Known archs (default: the matching model), counts, optimiser settings; ``augment`` and
    ``epochs`` per method (the reference's evaluation)."""
    archs = evaluation.archs if evaluation.archs is not None else [model]
    check(len(archs) >= 1, "eval.archs", "must name at least one architecture")
    for i, arch in enumerate(archs):
        check_model(arch, f"eval.archs[{i}]")
    if evaluation.epochs is None:
        evaluation = replace(evaluation, epochs=METHOD_DEFAULTS[method]["eval_epochs"])
    _at_least(evaluation, "eval", 1, ("runs", "epochs", "batch"))
    _at_least(evaluation, "eval", 0, ("every",), note=" (0: no intermediate evaluation)")
    _rates(evaluation, "eval", ("lr", "momentum", "weight_decay"))
    augment = METHOD_DEFAULTS[method]["eval_augment"] if evaluation.augment is None else evaluation.augment
    compile_ = evaluation.epochs >= COMPILE_AUTO_EVAL_EPOCHS if evaluation.compile is None else evaluation.compile
    return replace(evaluation, archs=archs, augment=augment, compile=compile_)


def check_device(device: str, precision: str) -> None:
    check(device in ("auto", "cpu") or device.startswith("cuda"), "device",
          f"expected auto, cpu or cuda[:N], got {device!r}")
    check(precision in PRECISIONS, "precision", f"expected one of {', '.join(PRECISIONS)}, got {precision!r}")
