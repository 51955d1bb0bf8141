"""Evaluation protocol: train fresh networks on a (synthetic or random real) set, test on the real
test split, report mean ± std over runs. Nothing is selected on the test set: the reported accuracy
is that of the last epoch of every run."""
from __future__ import annotations

import statistics

import torch
from tqdm.auto import tqdm

from .config import EvalConfig
from .data import ImageData
from .methods import init_synthetic
from .train import accuracy, new_model, train_classifier


def summarize(accs: list[float]) -> dict:
    """{mean, std, runs}; std is the population std (as the DD literature reports it)."""
    return {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "runs": list(accs)}


def evaluate_set(images: torch.Tensor, labels: torch.Tensor, data: ImageData, cfg: EvalConfig, seed: int,
                 progress: bool = True, desc: str = "eval") -> dict[str, dict]:
    """Train ``cfg.runs`` fresh models of every ``cfg.archs`` on (images, labels); returns
    {arch: {mean, std, runs}} with test accuracies as fractions in [0, 1]."""
    device = data.x_train.device
    x, y = images.to(device), labels.to(device)
    shape = (data.channels, data.num_classes, data.im_size)
    strategy = "color_crop_cutout_flip_scale_rotate" if cfg.dsa else "none"
    out = {}
    total = len(cfg.archs) * cfg.runs
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for arch in cfg.archs:
            accs = []
            for run in range(cfg.runs):
                run_seed = seed * 1000 + run
                model = new_model(arch, shape, seed=run_seed, device=device)
                gen = torch.Generator().manual_seed(run_seed)
                train_classifier(model, x, y, epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay, batch=cfg.batch, milestones=(cfg.epochs // 2,),
                                 dsa_strategy=strategy, gen=gen)
                accs.append(accuracy(model, data.x_test, data.y_test))
                bar.update(1)
            out[arch] = summarize(accs)
    return out


def random_real_subset(data: ImageData, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline every distilled set must beat: ``ipc`` random real images per class."""
    return init_synthetic(data, ipc, "real", torch.Generator().manual_seed(seed + 7919))
