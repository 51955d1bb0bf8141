"""What can be set: the config's sections as frozen dataclasses, one line of meaning per setting.

Each field's ``help`` (and, for a fixed vocabulary, its ``choices``) is what ``ptmdd config`` prints
and what :func:`~ptmdd_ray.config.json_schema` publishes for editors. ``None`` in a field means "the
published default for the chosen method", filled in by :func:`~ptmdd_ray.config.resolve`. The three
readers at the end (:func:`weight_for`, :func:`uses_ptms`, :func:`source_dataset`) answer questions
about a resolved config that several modules ask.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..sources import DOMAINS

METHODS = ("dc", "dsa", "dm", "mtt")
SCHEDULES = ("thirds", "constant")
INITS = ("real", "noise")
PRECISIONS = ("bf16", "bf16-cpu", "fp32")
MTT_GRADIENTS = ("unrolled", "recomputed")


def setting(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A field with its default and its one-line meaning (and its allowed values, if a fixed set).
    A list default is copied for every instance."""
    metadata = {"help": help, **({"choices": choices} if choices else {})}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


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

    name: str = setting("digits",
        "digits (embedded), cifar10, cifar100, mnist, fashionmnist, svhn, parquet:PATH or imagefolder:PATH")
    root: str = setting("data", "directory of the torchvision data sets (fashionmnist: its IDX files, "
                               "else Debian's /usr/share/datasets/fashion-mnist)")
    download: bool = setting(False, "let torchvision download the data set into root")
    im_size: int | None = setting(None, "image side in pixels; null: native size (digits: 16, upsampled from 8)")
    train_per_class: int | None = setting(None, "training images per class; null: all")
    test_per_class: int | None = setting(None, "test images per class; null: all")
    domain: str = setting("none", "derived domain: none, grayscale, lowres or invert", choices=DOMAINS)
    classes: list[int] | None = setting(None, "keep only these class indices (a new label space); null: all")
    val_per_class: int = setting(0,
        "training images per class held out as the validation split that every choice reads; 0: none")
    cache_dir: str | None = setting(None,
        "cache of the decoded images; null: beside the data, else ~/.cache/ptmdd_ray")
    zca: bool = setting(False, "ZCA-whiten the normalised images, fitted on the training split only (MTT's "
                               "reference: kornia's ZCAWhitening, eps 0.1); synthetic.png then shows whitened images")


@dataclass(frozen=True)
class DistillConfig:
    """The distillation method. ``None`` fields take the method's published default (see
    :data:`METHOD_DEFAULTS` and :func:`loops_for_ipc`)."""

    method: str = setting("dm", "distillation method: dc, dsa, dm or mtt", choices=METHODS)
    ipc: int = setting(10, "synthetic images per class")
    iterations: int | None = setting(None, "distillation iterations; null: the method's published default")
    lr_img: float | None = setting(None,
        "SGD learning rate of the synthetic images; null: the method's published default")
    lr_net: float = setting(0.01,
        "learning rate of the network trained on the synthetic set between matchings (DC, DSA)")
    momentum_img: float = setting(0.5, "SGD momentum of the synthetic images")
    batch_real: int = setting(256, "real images per class in each matching batch")
    batch_train: int = setting(256, "batch size of the network trained on the synthetic set (DC, DSA)")
    init: str | None = setting(None, "initial synthetic images: real (random real images) or noise; null: the "
                               "method's published default", choices=INITS)
    outer_loop: int | None = setting(None,
        "DC/DSA synthetic-set updates per network; null: the published table for the IPC")
    inner_loop: int | None = setting(None,
        "DC/DSA network epochs on the synthetic set between updates; null: the published table for the IPC")
    dsa_strategy: str | None = setting(None,
        "DSA augmentations, e.g. color_crop_cutout_flip_scale_rotate; null: the method's published default")
    syn_steps: int | None = setting(None,
        "MTT: differentiable student steps on the synthetic set per iteration (memory grows linearly with it); "
        "null: MTT's published value for the data set and IPC")
    expert_epochs: int | None = setting(None,
        "MTT: expert epochs the student's steps must cover (target = start + this); null: published value")
    max_start_epoch: int | None = setting(None,
        "MTT: start epochs are drawn from [0, this); null: MTT's published value for the data set and IPC")
    lr_lr: float | None = setting(None, "MTT: SGD learning rate of the learnable student step size; null: published")
    lr_teacher: float | None = setting(None,
        "MTT: initial student step size (learned, then the evaluation's learning rate); null: published")
    batch_syn: int | None = setting(None,
        "MTT: synthetic images per student step; null: the published value (the whole set but for CIFAR-100 IPC 50)")
    mtt_gradient: str = setting("unrolled",
        "MTT: the gradient through the student's steps: unrolled (the reference's graph; memory linear in "
        "syn_steps) or recomputed (TESLA's constant memory: each step recomputed backward, the same gradient up "
        "to float order, 1.23-1.27x the compute, BENCHMARKS.md)", choices=MTT_GRADIENTS)
    log_every: int = setting(10, "record the matching loss every this many iterations")
    compile: bool | None = setting(None,
        "run DM's network passes (DC/DSA: the inner loop's training steps) through torch.compile (~2x (DC/DSA ~1.6x) "
        "per iteration on the CPU, after a one-off compilation of ~30-60 s); null: on for DC, DSA and DM runs of "
        ">= 1000 iterations (each paired against eager by seed), off for shorter ones and MTT")
    checkpoint_every: int = setting(0,
        "a study trial checkpoints its state every this many iterations, so that a retried or resumed trial goes on "
        "from there; 0: a tenth of the run (resolved with the config, so MLflow records the interval used)")


@dataclass(frozen=True)
class PoolConfig:
    """The PTM pool: ``archs`` × ``seeds`` models, each the checkpoint at ``epoch`` of a pretraining
    run on ``source``. Nm = number of seeds, Na = len(archs); ``archs: []`` means no PTM.
    ``seeds`` is a count (seeds 0..n-1) or an explicit list. ``source`` is a dataset name (inheriting
    the target's size and subset options) or a full dataset mapping; ``None`` means the target."""

    archs: list[str] = setting([], "architectures of the PTM pool (Na = their number); []: no PTM")
    seeds: int | list[int] = setting(1, "PTMs per arch (Nm): a count (seeds 0..n-1) or a list of seeds")
    epoch: int = setting(5, "the checkpoint epoch of each PTM's pretraining run")
    source: str | DatasetConfig | None = setting(None,
        "the PTMs' data: a name (inheriting the target's size and subsets) or a mapping; null: the target")


@dataclass(frozen=True)
class PretrainConfig:
    """How a PTM is trained. Defaults follow the paper's code: a 150-epoch run, SGD lr 0.01, momentum
    0.9, weight decay 5e-3, lr x0.1 at 1/3 and 2/3 of the run, batch 256, no augmentation. MTT's
    experts are trained the reference's way instead (``MTT_EXPERT_RECIPE``: DSA, no momentum, a
    constant rate, 50 epochs), which a study sets here.
    ``epochs`` is the length of the run, i.e. its lr schedule: epoch 2 of a 150-epoch run is a
    different model from epoch 2 of a 2-epoch run. A run is only trained as far as the largest
    epoch asked for (``pool.epoch`` and ``save_epochs``), saving each of them on the way, so early
    (sub-optimal) PTMs cost only their own epochs."""

    epochs: int = setting(150, "length of a pretraining run, i.e. its lr schedule (x0.1 at 1/3 and 2/3)")
    lr: float = setting(0.01, "SGD learning rate of PTM pretraining")
    momentum: float = setting(0.9, "SGD momentum of PTM pretraining")
    weight_decay: float = setting(5e-3, "weight decay of PTM pretraining")
    batch: int = setting(256, "batch size of PTM pretraining")
    save_epochs: list[int] = setting([], "further epochs to checkpoint on the way (besides pool.epoch); 0: the "
                                     "initialisation")
    dsa_strategy: str = setting("none",
        "augmentation of every pretraining batch: none (the paper's PTMs) or a DSA strategy (MTT's experts)")
    schedule: str = setting("thirds", "learning-rate schedule: thirds (x0.1 at 1/3 and 2/3 of the run, the paper's "
                            "PTMs) or constant (MTT's experts)", choices=SCHEDULES)


@dataclass(frozen=True)
class LossConfig:
    """The paper's PTM losses. ``clom`` (alpha) and ``cclom`` (beta) are a weight or a map
    {arch: weight}. ``clom: None`` means the per-method default (:data:`METHOD_DEFAULTS`) when the
    pool is non-empty, else 0. By default they see the raw synthetic set, as in the reference code
    (whose weights are the defaults); ``augmented: true`` gives them the DSA-augmented images the
    matching term sees (an option, with its own weight scale: BENCHMARKS.md)."""

    clom: float | dict[str, float] | None = setting(None,
        "CLoM weight α: number or {arch: weight}; null: the method's published default (0 without pool.archs)")
    cclom: float | dict[str, float] = setting(0.0, "CCLoM weight β: a number or {arch: weight}")
    cclom_batch: int = setting(256, "real images in CCLoM's contrastive batch")
    augmented: bool = setting(False,
        "PTM losses on the DSA-augmented images the matching term sees (MTT: one DSA draw of the set per iteration); "
        "false: the raw synthetic images, as the reference code (and its published weights) do")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol: ``runs`` fresh models per arch trained on the synthetic set, SGD
    momentum 0.9, weight decay 5e-4, lr x0.1 at half of ``epochs``, each tested on the test split
    and (with ``dataset.val_per_class``) the validation split. ``augment`` (DSA augmentation while
    training them) defaults per method as in the reference code: off for DC, on for DSA and DM. The
    random real subset of the same IPC is evaluated the same way when ``baseline`` is on."""

    archs: list[str] | None = setting(None,
        "architectures trained on the synthetic set to evaluate it; null: the matching model")
    runs: int = setting(5, "fresh models trained per eval arch (the reference: 5)")
    epochs: int | None = setting(None,
        "training epochs of each evaluation model (lr x0.1 at half); null: the reference's (DC 300, DSA and DM 1000)")
    lr: float = setting(0.01, "SGD learning rate of the evaluation models")
    momentum: float = setting(0.9, "SGD momentum of the evaluation models")
    weight_decay: float = setting(5e-4, "weight decay of the evaluation models")
    batch: int = setting(256, "batch size of the evaluation models")
    augment: bool | None = setting(None,
        "DSA augmentation while training the evaluation models; null: the method's published default")
    baseline: bool = setting(True, "also evaluate a random real subset of the same IPC")
    every: int = setting(0,
        "also evaluate every this many iterations (1 run per arch, validation if held out); 0: at the end only")
    group: bool | None = setting(None,
        "train the runs of a ConvNet architecture (no BatchNorm) together as one grouped network, each model "
        "equal to its training alone up to float rounding; null: on CUDA (fewer kernel launches), not on the "
        "CPU (no faster there)")
    compile: bool | None = setting(None,
        "run the evaluation models' training passes through torch.compile; null: from 500 epochs on (DSA, DM) "
        "(compiling takes a minute, which short evaluations do not win back)")


@dataclass(frozen=True)
class Config:
    """One run: the data set, the matching model, the method, the PTM pool and its pretraining, the
    PTM losses, the evaluation, and where PTMs are stored and on what device it all runs."""

    seed: int = setting(0, "random seed of the run (a study adds the sample index)")
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: str = setting("ConvNet", "network used for matching (and the default eval arch)")
    distill: DistillConfig = field(default_factory=DistillConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    store: str = setting("ptm_store", "PTM checkpoint store: a directory or a pyarrow.fs URI (s3://...)")
    device: str = setting("auto", "auto, cpu or cuda[:N]")
    precision: str = setting("bf16", "bf16: bf16 autocast in PTM pretraining and evaluation on CUDA; "
                             "bf16-cpu: on a CPU with native bf16 too (~2x faster evaluation), and in "
                             "compiled distillation passes; fp32: off",
                             choices=PRECISIONS)


# --------------------------------------------------------------------------- reading a resolved config

def weight_for(w: float | dict[str, float], arch: str) -> float:
    """The weight of one arch from a number or an {arch: weight} map (missing arch: 0)."""
    return float(w.get(arch, 0.0)) if isinstance(w, dict) else float(w)


def uses_ptms(cfg: Config) -> bool:
    """True when some pool arch has a non-zero CLoM or CCLoM weight (else the pool is idle)."""
    return any(weight_for(cfg.loss.clom or 0.0, a) > 0 or weight_for(cfg.loss.cclom, a) > 0 for a in cfg.pool.archs)


def eval_split(cfg: Config) -> str:
    """The split a run's evaluations along the way (``eval.every``, what a scheduler prunes on) are
    scored on: validation where ``dataset.val_per_class`` holds one out, else test (then they are a
    curve to look at, and a study refuses to prune or search on them)."""
    return "val" if cfg.dataset.val_per_class > 0 else "test"


def mtt_reach(distill: DistillConfig) -> int:
    """The last expert epoch an MTT segment can end at: a start drawn from [0, max_start_epoch),
    plus ``expert_epochs``."""
    return distill.max_start_epoch - 1 + distill.expert_epochs


def source_dataset(cfg: Config) -> DatasetConfig:
    """The dataset the pool's PTMs are trained on. A bare name (like a mapping, see
    :func:`~ptmdd_ray.config.build_config`) inherits the target's image size, root, cache and subset
    sizes, but none of its domain or class subset."""
    src = cfg.pool.source
    if src is None:
        return cfg.dataset
    if isinstance(src, str):
        return replace(cfg.dataset, name=src, domain="none", classes=None)
    return src
