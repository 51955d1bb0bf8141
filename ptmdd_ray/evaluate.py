"""Evaluation protocol: train fresh networks on a (synthetic or random real) set, score them on the
real test split (and the validation split held out of training), report mean ± std over runs.
Nothing is selected on the test set: the reported accuracy is that of the last epoch of every run,
and every choice made across runs reads the validation scores."""
from __future__ import annotations

import statistics

import torch
from tqdm.auto import tqdm

from .config import DSA_STRATEGY, EvalConfig
from .data import ImageData
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
                 mixed_precision: bool = True) -> dict[str, dict[str, dict]]:
    """Train ``cfg.runs`` fresh models of every ``cfg.archs`` on (images, labels) and score each on
    every split of ``splits`` (default :func:`splits_of`): one training serves both the validation
    score (what choices are made on) and the test score (what is reported). Returns
    {split: {arch: {mean, std, runs}}} with accuracies as fractions in [0, 1]. ``mixed_precision``:
    bf16 autocast on CUDA (no effect on the CPU)."""
    device = data.x_train.device
    x, y = images.to(device), labels.to(device)
    shape = (data.channels, data.num_classes, data.im_size)
    strategy = DSA_STRATEGY if cfg.augment else "none"
    splits = splits or splits_of(data)
    scored = {split: data.split(split) for split in splits}
    accs: dict[str, dict[str, list[float]]] = {split: {} for split in splits}
    with tqdm(total=len(cfg.archs) * cfg.runs, desc=desc, disable=not progress, leave=False) as bar:
        for arch in cfg.archs:
            for run in range(cfg.runs):
                run_seed = seed * 1000 + run
                model = new_model(arch, shape, seed=run_seed, device=device)
                gen = torch.Generator().manual_seed(run_seed)
                train_classifier(model, x, y, epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay, batch=cfg.batch, milestones=(cfg.epochs // 2,),
                                 dsa_strategy=strategy, gen=gen, mixed_precision=mixed_precision)
                for split, (xs, ys) in scored.items():
                    accs[split].setdefault(arch, []).append(accuracy(model, xs, ys, mixed_precision=mixed_precision))
                bar.update(1)
    return {split: {arch: summarize(a) for arch, a in by_arch.items()} for split, by_arch in accs.items()}


def random_real_subset(data: ImageData, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline every distilled set must beat: ``ipc`` random real images per class."""
    return init_synthetic(data, ipc, "real", torch.Generator().manual_seed(seed + 7919))
