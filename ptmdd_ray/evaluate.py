"""Evaluation protocol: train fresh networks on a (synthetic or random real) set, score them on the
real test split (and the validation split held out of training), report mean ± std over runs.
Nothing is selected on the test set: the reported accuracy is that of the last epoch of every run,
and every choice made across runs reads the validation scores."""
from __future__ import annotations

import statistics

import torch
from tqdm.auto import tqdm

from .compiled import CompiledCall
from .config import DSA_STRATEGY, EvalConfig
from .data import ImageData
from .grouped import GroupedNet, group_accuracy, groupable, train_group
from .synthetic import init_synthetic
from .train import accuracy, new_model, train_classifier


def summarize(accs: list[float]) -> dict:
    """{mean, std, runs}; std is the population std (as the DD literature reports it)."""
    return {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "runs": list(accs)}


def splits_of(data: ImageData) -> tuple[str, ...]:
    """The splits a set is scored on: test, and validation where the data hold one out."""
    return ("test", "val") if data.has_val else ("test",)


def evaluate_set(images: torch.Tensor, labels: torch.Tensor, data: ImageData, cfg: EvalConfig, seed: int,
                 progress: bool = True, desc: str = "eval", splits: tuple[str, ...] | None = None,
                 precision: str = "bf16") -> dict[str, dict[str, dict]]:
    """Train ``cfg.runs`` fresh models of every ``cfg.archs`` on (images, labels) and score each on
    every split of ``splits`` (default :func:`splits_of`): one training serves both the validation
    score (what choices are made on) and the test score (what is reported). Returns
    {split: {arch: {mean, std, runs}}} with accuracies as fractions in [0, 1]. Run ``i`` of every
    arch is seeded ``seed * 1000 + i`` (its initialisation, shuffles and augmentations), whether
    the runs train as one grouped network (``cfg.group``, :mod:`ptmdd_ray.grouped`) or one at a
    time. ``precision``: the run's ``precision`` (:func:`ptmdd_ray.train.autocast`)."""
    x, y = images.to(data.x_train.device), labels.to(data.x_train.device)
    scored = {split: data.split(split) for split in splits or splits_of(data)}
    accs: dict[str, dict[str, list[float]]] = {split: {} for split in scored}
    with tqdm(total=len(cfg.archs) * cfg.runs, desc=desc, disable=not progress, leave=False) as bar:
        for arch in cfg.archs:
            train = _grouped if groups(cfg, x.device) and groupable(arch) else _one_at_a_time
            for split, runs in train(arch, x, y, data, cfg, seed, scored, precision, bar).items():
                accs[split][arch] = runs
    return {split: {arch: summarize(a) for arch, a in by_arch.items()} for split, by_arch in accs.items()}


def groups(cfg: EvalConfig, device: torch.device) -> bool:
    """Whether the runs train as one grouped network: ``eval.group``, by default on CUDA only. On
    the CPU one grouped pass costs what the R passes cost (bench/bench_eval.py: the work is the
    same and the CPU is busy either way), while on a GPU R small passes are R times the kernel
    launches of one."""
    return cfg.group if cfg.group is not None else device.type == "cuda"


def _run_seeds(seed: int, cfg: EvalConfig) -> list[int]:
    """The seed of each evaluation run: its initialisation, shuffles and augmentations."""
    return [seed * 1000 + run for run in range(cfg.runs)]


def _shape(data: ImageData) -> tuple[int, int, int]:
    return data.channels, data.num_classes, data.im_size


def _train_kwargs(cfg: EvalConfig) -> dict:
    return dict(epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                batch=cfg.batch, milestones=(cfg.epochs // 2,), dsa_strategy=DSA_STRATEGY if cfg.augment else "none")


def _one_at_a_time(arch, x, y, data, cfg, seed, scored, precision, bar) -> dict[str, list[float]]:
    """The reference's protocol: one model after the other (its training steps through
    ``torch.compile`` with ``cfg.compile``); {split: accuracy of each run}."""
    out: dict[str, list[float]] = {split: [] for split in scored}
    for run_seed in _run_seeds(seed, cfg):
        model = new_model(arch, _shape(data), seed=run_seed, device=x.device)
        forward = CompiledCall(model, "forward") if cfg.compile else None
        train_classifier(model, x, y, gen=torch.Generator().manual_seed(run_seed), precision=precision,
                         forward=forward, **_train_kwargs(cfg))
        for split, (xs, ys) in scored.items():
            out[split].append(accuracy(model, xs, ys, precision=precision))
        bar.update(1)
    return out


def _grouped(arch, x, y, data, cfg, seed, scored, precision, bar) -> dict[str, list[float]]:
    """All runs of ``arch`` as one grouped network (the same seeds); {split: accuracy of each run}."""
    run_seeds = _run_seeds(seed, cfg)
    net = GroupedNet([new_model(arch, _shape(data), seed=s, device=x.device) for s in run_seeds],
                     compile=bool(cfg.compile))
    train_group(net, x, y, gens=[torch.Generator().manual_seed(s) for s in run_seeds],
                precision=precision, **_train_kwargs(cfg))
    out = {split: group_accuracy(net, xs, ys, precision=precision) for split, (xs, ys) in scored.items()}
    bar.update(cfg.runs)
    return out


def random_real_subset(data: ImageData, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline every distilled set must beat: ``ipc`` random real images per class."""
    return init_synthetic(data, ipc, "real", torch.Generator().manual_seed(seed + 7919))
