"""Typed, validated configuration: one object drives the CLI, the tests and (later) Ray Tune and MLflow.

A YAML mapping is parsed into frozen dataclasses by :func:`from_dict`, which rejects unknown keys and
wrong types with a :class:`ConfigError` whose message names the dotted key (``distill.ipc``).
``None`` in a field means "the published default for the chosen method"; :func:`resolve` fills those
in, so the resolved config written to ``result.json`` is the complete record of what ran.
:func:`flatten` gives the flat dotted names used for ``--set`` overrides, sweeps and MLflow params.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """Bad user input. The message is one line and names the offending key."""


# --------------------------------------------------------------------------- sections

DOMAINS = ("none", "grayscale", "lowres", "invert")
METHODS = ("dc", "dsa", "dm")
INITS = ("real", "noise")
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DatasetConfig:
    """Which images, and how they are shaped. ``name`` is ``digits`` (embedded, offline), a torchvision
    name (``cifar10``, ``cifar100``, ``mnist``, ``fashionmnist``, ``svhn``), ``parquet:PATH`` or
    ``imagefolder:PATH``. ``domain`` and ``classes`` derive a new domain or label space from it, which
    is how PTMs from "elsewhere" are made for the domain-match study.

    ``val_per_class`` holds out that many *training* images per class as a validation split, with
    a fixed seed, before anything else sees the data: every choice (a search, a pruning, a
    default) is made on it, and the test split only reports. The held-out images are drawn per
    class of the full label space, so a PTM source reading the same files with another class
    subset or domain holds out the same images and never trains on the target's validation set."""

    name: str = field(default="digits", metadata={
        "help": "digits (embedded), cifar10, cifar100, mnist, fashionmnist, svhn, parquet:PATH or imagefolder:PATH"})
    root: str = field(default="data", metadata={"help": "directory of the torchvision data sets"})
    download: bool = field(default=False, metadata={"help": "let torchvision download the data set into root"})
    im_size: int | None = field(default=None, metadata={
        "help": "image side in pixels; null: native size (digits: 16, upsampled from 8)"})
    train_per_class: int | None = field(default=None, metadata={"help": "training images per class; null: all"})
    test_per_class: int | None = field(default=None, metadata={"help": "test images per class; null: all"})
    domain: str = field(default="none", metadata={"help": "derived domain: none, grayscale, lowres or invert"})
    classes: list[int] | None = field(default=None, metadata={
        "help": "keep only these class indices (a new label space); null: all"})
    val_per_class: int = field(default=0, metadata={
        "help": "training images per class held out as the validation split that every choice reads; 0: none"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "cache of the decoded images; null: beside the data, else ~/.cache/ptmdd_ray"})


@dataclass(frozen=True)
class DistillConfig:
    """The distillation method. ``None`` fields take the method's published default (see
    :data:`METHOD_DEFAULTS` and :func:`ptmdd_ray.methods.loops_for_ipc`)."""

    method: str = field(default="dm", metadata={"help": "distillation method: dc, dsa or dm"})
    ipc: int = field(default=10, metadata={"help": "synthetic images per class"})
    iterations: int | None = field(default=None, metadata={
        "help": "distillation iterations; null: the method's published default"})
    lr_img: float | None = field(default=None, metadata={
        "help": "SGD learning rate of the synthetic images; null: the method's published default"})
    lr_net: float = field(default=0.01, metadata={
        "help": "learning rate of the network trained on the synthetic set between matchings (DC, DSA)"})
    momentum_img: float = field(default=0.5, metadata={"help": "SGD momentum of the synthetic images"})
    batch_real: int = field(default=256, metadata={"help": "real images per class in each matching batch"})
    batch_train: int = field(default=256, metadata={
        "help": "batch size of the network trained on the synthetic set (DC, DSA)"})
    init: str | None = field(default=None, metadata={
        "help": "initial synthetic images: real (random real images) or noise; null: the method's published default"})
    outer_loop: int | None = field(default=None, metadata={
        "help": "DC/DSA synthetic-set updates per network; null: the published table for the IPC"})
    inner_loop: int | None = field(default=None, metadata={
        "help": "DC/DSA network epochs on the synthetic set between updates; null: the published table for the IPC"})
    dsa_strategy: str | None = field(default=None, metadata={
        "help": "DSA augmentations, e.g. color_crop_cutout_flip_scale_rotate; null: the method's published default"})
    log_every: int = field(default=10, metadata={"help": "record the matching loss every this many iterations"})
    compile: bool | None = field(default=None, metadata={
        "help": "run DM's network passes through torch.compile (~2x per iteration on the CPU, after a "
                "one-off compilation of ~30-60 s); null: on for DM runs of >= 1000 iterations"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "a study trial checkpoints its state every this many iterations, so that a retried or "
                "resumed trial goes on from there; 0: every tenth of the run"})


@dataclass(frozen=True)
class PoolConfig:
    """The PTM pool: ``archs`` × ``seeds`` models, each the checkpoint at ``epoch`` of a pretraining
    run on ``source``. Nm = number of seeds, Na = len(archs); ``archs: []`` means no PTM.
    ``seeds`` is a count (seeds 0..n-1) or an explicit list. ``source`` is a dataset name (inheriting
    the target's size and subset options) or a full dataset mapping; ``None`` means the target."""

    archs: list[str] = field(default_factory=list, metadata={
        "help": "architectures of the PTM pool (Na = their number); []: no PTM"})
    seeds: int | list[int] = field(default=1, metadata={
        "help": "PTMs per arch (Nm): a count (seeds 0..n-1) or a list of seeds"})
    epoch: int = field(default=5, metadata={"help": "the checkpoint epoch of each PTM's pretraining run"})
    source: str | DatasetConfig | None = field(default=None, metadata={
        "help": "the PTMs' data: a name (inheriting the target's size and subsets) or a mapping; null: the target"})


@dataclass(frozen=True)
class PretrainConfig:
    """How a PTM is trained. Defaults follow the paper's code: a 150-epoch run, SGD lr 0.01, momentum
    0.9, weight decay 5e-3, lr x0.1 at 1/3 and 2/3 of the run, batch 256, no augmentation.
    ``epochs`` is the length of the run, i.e. its lr schedule: epoch 2 of a 150-epoch run is a
    different model from epoch 2 of a 2-epoch run. A run is only trained as far as the largest
    epoch asked for (``pool.epoch`` and ``save_epochs``), saving each of them on the way, so early
    (sub-optimal) PTMs cost only their own epochs."""

    epochs: int = field(default=150, metadata={
        "help": "length of a pretraining run, i.e. its lr schedule (x0.1 at 1/3 and 2/3)"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate of PTM pretraining"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum of PTM pretraining"})
    weight_decay: float = field(default=5e-3, metadata={"help": "weight decay of PTM pretraining"})
    batch: int = field(default=256, metadata={"help": "batch size of PTM pretraining"})
    save_epochs: list[int] = field(default_factory=list, metadata={
        "help": "further epochs to checkpoint on the way (besides pool.epoch)"})


@dataclass(frozen=True)
class LossConfig:
    """The paper's PTM losses. ``clom`` (alpha) and ``cclom`` (beta) are a weight or a map
    {arch: weight}. ``clom: None`` means the per-method default (:data:`METHOD_DEFAULTS`) when the
    pool is non-empty, else 0. ``augmented: false``
    applies them to the raw synthetic set instead, as the reference code did (an ablation knob)."""

    clom: float | dict[str, float] | None = field(default=None, metadata={
        "help": "CLoM weight α: number or {arch: weight}; null: the method's published default (0 without pool.archs)"})
    cclom: float | dict[str, float] = field(default=0.0, metadata={
        "help": "CCLoM weight β: a number or {arch: weight}"})
    cclom_batch: int = field(default=256, metadata={"help": "real images in CCLoM's contrastive batch"})
    augmented: bool = field(default=True, metadata={
        "help": "PTM losses on the DSA-augmented images the matching term sees; false: raw images (reference code)"})


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol: ``runs`` fresh models per arch trained on the synthetic set, SGD
    momentum 0.9, weight decay 5e-4, lr x0.1 at half of ``epochs``, each tested on the test split
    and (with ``dataset.val_per_class``) the validation split. ``augment`` (DSA augmentation while
    training them) defaults per method as in the reference code: off for DC, on for DSA and DM. The
    random real subset of the same IPC is evaluated the same way when ``baseline`` is on."""

    archs: list[str] | None = field(default=None, metadata={
        "help": "architectures trained on the synthetic set to evaluate it; null: the matching model"})
    runs: int = field(default=3, metadata={"help": "fresh models trained per eval arch"})
    epochs: int = field(default=300, metadata={"help": "training epochs of each evaluation model (lr x0.1 at half)"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate of the evaluation models"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum of the evaluation models"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay of the evaluation models"})
    batch: int = field(default=256, metadata={"help": "batch size of the evaluation models"})
    augment: bool | None = field(default=None, metadata={
        "help": "DSA augmentation while training the evaluation models; null: the method's published default"})
    baseline: bool = field(default=True, metadata={"help": "also evaluate a random real subset of the same IPC"})
    every: int = field(default=0, metadata={
        "help": "also evaluate every this many iterations (1 run per arch, validation if held out); 0: at the end only"})


@dataclass(frozen=True)
class Config:
    seed: int = field(default=0, metadata={"help": "random seed of the run (a study adds the sample index)"})
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: str = field(default="ConvNet", metadata={"help": "network used for matching (and the default eval arch)"})
    distill: DistillConfig = field(default_factory=DistillConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    store: str = field(default="ptm_store", metadata={
        "help": "PTM checkpoint store: a directory or a pyarrow.fs URI (s3://...)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]"})
    precision: str = field(default="bf16", metadata={
        "help": "on CUDA: bf16 autocast in PTM pretraining and evaluation; fp32: off"})


# Published defaults: DC (Zhao et al., ICLR 2021), DSA (Zhao & Bilen, ICML 2021), DM (Zhao & Bilen,
# WACV 2023). CLoM weights: DC 1000 and DSA 5000 are Lu et al. 2023's CIFAR-10 IPC-10 table, tuned
# for CLoM on the raw synthetic images; DM 100 is chosen here on a validation split for CLoM on the
# augmented images (alpha 0/10/30/100/1000; the table's 2000 was for raw images, BENCHMARKS.md). Evaluation
# augmentation follows the reference evaluate_synset: DC trains its evaluation models without
# augmentation on CIFAR (get_daparam's 'none'), DSA and DM with DSA.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dc": {"iterations": 1000, "lr_img": 0.1, "init": "noise", "dsa_strategy": "none", "clom": 1000.0,
           "eval_augment": False},
    "dsa": {"iterations": 1000, "lr_img": 0.1, "init": "real", "dsa_strategy": DSA_STRATEGY, "clom": 5000.0,
            "eval_augment": True},
    "dm": {"iterations": 20000, "lr_img": 1.0, "init": "real", "dsa_strategy": DSA_STRATEGY, "clom": 100.0,
           "eval_augment": True},
}
PRECISIONS = ("bf16", "fp32")
COMPILE_AUTO_ITERATIONS = 1000  # distill.compile: null turns compilation on from this many DM iterations


# --------------------------------------------------------------------------- parsing

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        k_tp, v_tp = typing.get_args(tp)
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(float(value)):
                raise ConfigError(f"{key}: NaN is not allowed")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - annotation we do not support
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain-data (YAML/JSON-ready) form of a config object."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flat dotted names (``distill.ipc``) -> values, the vocabulary shared by ``--set``, sweeps and
    MLflow params. Lists and weight maps stay whole values."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    out: dict[str, Any] = {}
    for k, v in data.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("clom", "cclom"):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating intermediate mappings."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if isinstance(child, str) and p == "source":  # pool.source: name -> mapping
            child = {"name": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {p} is not a mapping")
        node[p] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value (``distill.ipc=1``, ``pool.archs=[ConvNet,MLP]``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} ({type(e).__name__})") from None
    return key, value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: cannot read {path} ({type(e).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config: malformed YAML in {path}{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """YAML file (or ``base`` mapping) + ``--set`` overrides -> validated, resolved :class:`Config`."""
    data = dict(base or {})
    if path is not None:
        data.update(load_yaml(path))
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return build_config(data)


PATH_PREFIXES = ("parquet:", "imagefolder:")


def anchor_paths(data: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """Make the relative paths of a config mapping (dataset files, roots and caches, a PTM
    source's, the store) absolute against ``base``, in place. A study's trials run in working
    directories of their own, so the paths are anchored where the study was launched."""
    def path(p: str) -> str:
        return p if "://" in p or os.path.isabs(os.path.expanduser(p)) else os.path.join(base, p)

    def dataset(ds: Any, defaults: bool) -> Any:
        if isinstance(ds, str):
            for prefix in PATH_PREFIXES:
                if ds.startswith(prefix):
                    return prefix + path(ds[len(prefix):])
            return ds
        if isinstance(ds, dict):
            if defaults:
                ds.setdefault("root", DatasetConfig.root)
            if isinstance(ds.get("name"), str):
                ds["name"] = dataset(ds["name"], False)
            for key in ("root", "cache_dir"):
                if isinstance(ds.get(key), str):
                    ds[key] = path(ds[key])
        return ds

    if isinstance(data.get("dataset"), dict):
        dataset(data["dataset"], True)
    if isinstance(data.get("pool"), dict) and data["pool"].get("source") is not None:
        data["pool"]["source"] = dataset(data["pool"]["source"], False)
    if isinstance(data.get("store"), str):
        data["store"] = path(data["store"])
    return data


def build_config(data: dict[str, Any]) -> Config:
    """Mapping -> validated, resolved :class:`Config`. A ``pool.source`` mapping starts from the
    target dataset (less its domain and class subset), so ``{domain: invert}`` means "the target,
    inverted" and keeps the target's image size and subset sizes."""
    pool = data.get("pool")
    if isinstance(pool, dict) and isinstance(pool.get("source"), dict):
        target = data.get("dataset") or {}
        if isinstance(target, dict):
            inherited = {k: v for k, v in target.items() if k not in ("domain", "classes")}
            data = {**data, "pool": {**pool, "source": {**inherited, **pool["source"]}}}
    return resolve(from_dict(Config, data))


# --------------------------------------------------------------------------- resolution

def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _check_weight(w: float | dict[str, float], key: str, archs: list[str]) -> None:
    items = w.items() if isinstance(w, dict) else [(None, w)]
    for arch, v in items:
        k = key if arch is None else f"{key}.{arch}"
        _check(math.isfinite(v) and v >= 0, k, f"must be a finite number >= 0, got {v!r}")
        if arch is not None:
            _check(arch in archs, k, f"{arch!r} is not in pool.archs {archs}")


def weight_for(w: float | dict[str, float], arch: str) -> float:
    """The weight of one arch from a number or an {arch: weight} map (missing arch: 0)."""
    return float(w.get(arch, 0.0)) if isinstance(w, dict) else float(w)


def uses_ptms(cfg: Config) -> bool:
    """True when some pool arch has a non-zero CLoM or CCLoM weight (else the pool is idle)."""
    return any(weight_for(cfg.loss.clom or 0.0, a) > 0 or weight_for(cfg.loss.cclom, a) > 0 for a in cfg.pool.archs)


def source_dataset(cfg: Config) -> DatasetConfig:
    """The dataset the pool's PTMs are trained on. A bare name (like a mapping, see
    :func:`build_config`) inherits the target's image size, root, cache and subset sizes, but none
    of its domain or class subset."""
    src = cfg.pool.source
    if src is None:
        return cfg.dataset
    if isinstance(src, str):
        return replace(cfg.dataset, name=src, domain="none", classes=None)
    return src


def resolve(cfg: Config) -> Config:
    """Validate ranges and fill method defaults. Raises :class:`ConfigError` naming the key."""
    from . import data as data_mod  # local: data imports torch; config stays light
    from . import models

    d = cfg.distill
    _check(d.method in METHODS, "distill.method", f"unknown method {d.method!r} (known: {', '.join(METHODS)})")
    defaults = METHOD_DEFAULTS[d.method]
    _check(d.ipc >= 1, "distill.ipc", f"must be >= 1, got {d.ipc}")
    for name in ("iterations", "outer_loop", "inner_loop"):
        v = getattr(d, name)
        _check(v is None or v >= 1 if name != "iterations" else v is None or v >= 0, f"distill.{name}",
               f"must be >= {1 if name != 'iterations' else 0}, got {v}")
    for name in ("batch_real", "batch_train", "log_every"):
        _check(getattr(d, name) >= 1, f"distill.{name}", f"must be >= 1, got {getattr(d, name)}")
    _check(d.checkpoint_every >= 0, "distill.checkpoint_every", f"must be >= 0, got {d.checkpoint_every}")
    for name in ("lr_img", "lr_net", "momentum_img"):
        v = getattr(d, name)
        _check(v is None or (math.isfinite(v) and v >= 0), f"distill.{name}", f"must be a finite number >= 0, got {v}")
    init = d.init or defaults["init"]
    _check(init in INITS, "distill.init", f"unknown init {init!r} (known: {', '.join(INITS)})")
    strategy = d.dsa_strategy or defaults["dsa_strategy"]
    from .augment import check_strategy
    try:
        check_strategy(strategy)
    except ValueError as e:
        raise ConfigError(f"distill.dsa_strategy: {e}") from None
    from .methods import loops_for_ipc
    outer, inner = loops_for_ipc(d.ipc)
    distill = replace(
        d,
        iterations=defaults["iterations"] if d.iterations is None else d.iterations,
        lr_img=defaults["lr_img"] if d.lr_img is None else d.lr_img,
        init=init,
        dsa_strategy=strategy,
        outer_loop=d.outer_loop or outer,
        inner_loop=d.inner_loop or inner,
    )
    if distill.compile is None:  # worth its compilation time on long runs only
        distill = replace(distill, compile=d.method == "dm" and distill.iterations >= COMPILE_AUTO_ITERATIONS)

    _check(models.is_known(cfg.model), "model", f"unknown architecture {cfg.model!r}")
    data_mod.check_dataset_config(cfg.dataset, "dataset")

    p = cfg.pool
    for i, a in enumerate(p.archs):
        _check(models.is_known(a), f"pool.archs[{i}]", f"unknown architecture {a!r}")
    _check(len(set(p.archs)) == len(p.archs), "pool.archs", "duplicate architecture")
    seeds = list(range(p.seeds)) if isinstance(p.seeds, int) else list(p.seeds)
    _check(len(seeds) >= 1 and (not isinstance(p.seeds, int) or p.seeds >= 1), "pool.seeds",
           f"must be >= 1, got {p.seeds}")
    _check(len(set(seeds)) == len(seeds), "pool.seeds", "duplicate seed")
    _check(p.epoch >= 1, "pool.epoch", f"must be >= 1, got {p.epoch}")
    pool = replace(p, seeds=seeds)
    cfg = replace(cfg, pool=pool)
    src = source_dataset(cfg)
    if p.source is not None:
        data_mod.check_dataset_config(src, "pool.source")
        _check(src.name != cfg.dataset.name or src.val_per_class >= cfg.dataset.val_per_class,
               "pool.source.val_per_class", f"{src.val_per_class} is below dataset.val_per_class "
               f"{cfg.dataset.val_per_class}: the PTMs read the same files and would train on validation images")
    cfg = replace(cfg, pool=replace(pool, source=src if p.source is not None else None))

    t = cfg.pretrain
    epochs = t.epochs
    _check(epochs >= 1, "pretrain.epochs", f"must be >= 1, got {epochs}")
    _check(p.epoch <= epochs, "pool.epoch", f"{p.epoch} is past pretrain.epochs {epochs}")
    for i, e in enumerate(t.save_epochs):
        _check(1 <= e <= epochs, f"pretrain.save_epochs[{i}]", f"must be in 1..{epochs}, got {e}")
    for name in ("lr", "momentum", "weight_decay"):
        v = getattr(t, name)
        _check(math.isfinite(v) and v >= 0, f"pretrain.{name}", f"must be a finite number >= 0, got {v}")
    _check(t.batch >= 1, "pretrain.batch", f"must be >= 1, got {t.batch}")
    pretrain = replace(t, epochs=epochs)

    l = cfg.loss
    clom = l.clom if l.clom is not None else (defaults["clom"] if p.archs else 0.0)
    _check_weight(clom, "loss.clom", p.archs)
    _check_weight(l.cclom, "loss.cclom", p.archs)
    _check(l.cclom_batch >= 1, "loss.cclom_batch", f"must be >= 1, got {l.cclom_batch}")
    if not p.archs:
        _check(not any(not isinstance(w, dict) and w > 0 for w in (clom, l.cclom)), "loss",
               "clom/cclom > 0 needs a non-empty pool.archs")
    loss = replace(l, clom=clom)

    e = cfg.eval
    eval_archs = e.archs if e.archs is not None else [cfg.model]
    _check(len(eval_archs) >= 1, "eval.archs", "must name at least one architecture")
    for i, a in enumerate(eval_archs):
        _check(models.is_known(a), f"eval.archs[{i}]", f"unknown architecture {a!r}")
    _check(e.runs >= 1, "eval.runs", f"must be >= 1, got {e.runs}")
    _check(e.epochs >= 1, "eval.epochs", f"must be >= 1, got {e.epochs}")
    _check(e.batch >= 1, "eval.batch", f"must be >= 1, got {e.batch}")
    _check(e.every >= 0, "eval.every", f"must be >= 0 (0: no intermediate evaluation), got {e.every}")
    for name in ("lr", "momentum", "weight_decay"):
        v = getattr(e, name)
        _check(math.isfinite(v) and v >= 0, f"eval.{name}", f"must be a finite number >= 0, got {v}")
    ev = replace(e, archs=eval_archs, augment=defaults["eval_augment"] if e.augment is None else e.augment)

    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
           f"expected auto, cpu or cuda[:N], got {cfg.device!r}")
    _check(cfg.precision in PRECISIONS, "precision", f"expected {' or '.join(PRECISIONS)}, got {cfg.precision!r}")
    _check(bool(cfg.store), "store", "must not be empty")
    return replace(cfg, distill=distill, pretrain=pretrain, loss=loss, eval=ev)


# --------------------------------------------------------------------------- reference

def describe(cfg: Config | None = None) -> list[dict[str, Any]]:
    """Every flat key of ``cfg`` (default: the unresolved defaults) with its value, its type and the
    one-line meaning kept in its field's ``help`` metadata: what ``ptmdd config`` prints. Names and
    values come from :func:`flatten` and the rest from the fields, so nothing is spelled twice."""
    def field_at(cls: type, key: str) -> tuple[dataclasses.Field, Any]:
        head, _, rest = key.partition(".")
        tp = typing.get_type_hints(cls)[head]
        if not rest:
            return next(f for f in fields(cls) if f.name == head), tp
        return field_at(next(t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)), rest)

    rows = []
    for key, value in flatten(Config() if cfg is None else cfg).items():
        f, tp = field_at(Config, key)
        rows.append({"key": key, "default": value, "type": _type_name(tp), "help": f.metadata.get("help", "")})
    return rows
