"""What the papers fixed: the published defaults of DC, DSA and DM, DC's loop table and DSA's ops.

A config leaves a setting ``None`` to mean "the published default for the chosen method";
:func:`~ptmdd_ray.config.resolve` fills it from here, so the resolved config records what ran.
The tables are plain data (no torch): :mod:`ptmdd_ray.methods` and :mod:`ptmdd_ray.augment` read
the same ones.
"""
from __future__ import annotations

import math
from typing import Any

# DSA's ops (Zhao & Bilen, ICML 2021); a strategy ``a_b_c`` applies one op drawn per call.
DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # all of them: DSA's and DM's published strategy


def check_strategy(strategy: str) -> list[str]:
    """Ops of a strategy string (``"none"`` -> []); raises ValueError on an unknown op."""
    if strategy in ("none", ""):
        return []
    ops = strategy.split("_")
    for op in ops:
        if op not in DSA_OPS:
            raise ValueError(f"unknown DSA op {op!r} in {strategy!r} (known: {', '.join(DSA_OPS)})")
    return ops


# Published defaults: DC (Zhao et al., ICLR 2021), DSA (Zhao & Bilen, ICML 2021), DM (Zhao & Bilen,
# WACV 2023). CLoM weights are Lu et al. 2023's CIFAR-10 IPC-10 table (DC 1000, DSA 5000, DM 2000),
# tuned, as the reference code applies them, on the raw synthetic images (loss.augmented: false, the
# default). Evaluation follows the reference evaluate_synset: DC trains its evaluation models 300
# epochs without augmentation on CIFAR (get_daparam's 'none'), DSA and DM 1000 epochs with DSA;
# each set is evaluated by REFERENCE_EVAL_RUNS fresh models per architecture.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dc": {"iterations": 1000, "lr_img": 0.1, "init": "noise", "dsa_strategy": "none", "clom": 1000.0,
           "eval_augment": False, "eval_epochs": 300},
    "dsa": {"iterations": 1000, "lr_img": 0.1, "init": "real", "dsa_strategy": DSA_STRATEGY, "clom": 5000.0,
            "eval_augment": True, "eval_epochs": 1000},
    "dm": {"iterations": 20000, "lr_img": 1.0, "init": "real", "dsa_strategy": DSA_STRATEGY, "clom": 2000.0,
           "eval_augment": True, "eval_epochs": 1000},
}
# MTT (Cazenavette et al., CVPR 2022): no CLoM weight was ever published for it (the paper's code
# has no MTT), so guidance is off unless a config sets loss.clom; its lr_img comes per IPC from
# MTT_TABLE. Evaluation as the reference's: 1000 epochs with DSA, at the learned step size.
METHOD_DEFAULTS["mtt"] = {"iterations": 5000, "lr_img": None, "init": "real", "dsa_strategy": DSA_STRATEGY,
                          "clom": 0.0, "eval_augment": True, "eval_epochs": 1000}

# MTT's published settings per data set and IPC. The reference README's hyper-parameter table is an
# image, and public re-runs transcribe it differently; these rows are DC-Bench's (Cui et al., NeurIPS
# 2022 Datasets and Benchmarks, justincui03/dc_benchmark methods/tm/readme.md: "all the sota parameters
# are provided by the author"), whose CIFAR-100 IPC 1 row is also the reference README's one command.
# Per row: differentiable student steps per iteration (syn_steps), expert epochs the students must
# cover (expert_epochs), start epochs drawn from [0, max_start_epoch), the pixels' and the step
# size's learning rates (lr_img, lr_lr), the initial step size (lr_teacher), the synthetic batch
# per student step (batch_syn; None: the whole set), and whether the images were ZCA-whitened: the
# learning rates were tuned with that whitening (dataset.zca), and a run without it says so.
# Until 2026-12-07 this table had CIFAR-10 IPC 10 at lr_img 1e5, lr_lr 1e-4, lr_teacher 0.01 and
# IPC 50 at lr_teacher 0.01, found in no transcription (studies that relied on them pin them).
MTT_TABLE: dict[str, dict[int, dict[str, Any]]] = {
    "cifar10": {
        1: {"syn_steps": 50, "expert_epochs": 2, "max_start_epoch": 2, "lr_img": 100.0, "lr_lr": 1e-7,
            "lr_teacher": 0.01, "batch_syn": None, "zca": True},
        10: {"syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 20, "lr_img": 100.0, "lr_lr": 1e-5,
             "lr_teacher": 0.001, "batch_syn": None, "zca": True},
        50: {"syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 40, "lr_img": 1000.0, "lr_lr": 1e-5,
             "lr_teacher": 0.001, "batch_syn": None, "zca": False},
    },
    "cifar100": {
        1: {"syn_steps": 20, "expert_epochs": 3, "max_start_epoch": 20, "lr_img": 1000.0, "lr_lr": 1e-5,
            "lr_teacher": 0.01, "batch_syn": None, "zca": True},
        10: {"syn_steps": 20, "expert_epochs": 2, "max_start_epoch": 20, "lr_img": 1000.0, "lr_lr": 1e-5,
             "lr_teacher": 0.01, "batch_syn": None, "zca": False},
        50: {"syn_steps": 80, "expert_epochs": 2, "max_start_epoch": 40, "lr_img": 1000.0, "lr_lr": 1e-5,
             "lr_teacher": 0.01, "batch_syn": 125, "zca": True},
    },
}

# How the reference trains its experts (buffer.py): SGD lr 0.01 without momentum or weight decay, DSA
# on every batch, batch 256, 50 epochs, a constant learning rate, every epoch kept.
MTT_EXPERT_RECIPE = {"epochs": 50, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "batch": 256,
                     "dsa_strategy": DSA_STRATEGY, "schedule": "constant"}


def mtt_table_for(kind: str) -> str:
    """Which published MTT rows a data set takes: its own where MTT published them (CIFAR-10,
    CIFAR-100), else CIFAR-10's, the nearest published (digits, Fashion-MNIST and file sources;
    a CIFAR-100 read from a file sets its settings itself)."""
    return kind if kind in MTT_TABLE else "cifar10"


def mtt_for_ipc(ipc: int, table: str = "cifar10") -> dict[str, Any]:
    """MTT's published settings for ``ipc`` in ``table`` (see :func:`mtt_table_for`); off the table,
    those of the nearest published IPC (on a log scale: IPC 3 takes IPC 1's, IPC 4 IPC 10's)."""
    rows = MTT_TABLE[table]
    return dict(rows[min(rows, key=lambda k: (abs(math.log(ipc / k)), k))])


REFERENCE_EVAL_RUNS = 5  # models per architecture in the reference's evaluation (its runs: 5 to 20)
COMPILE_AUTO_ITERATIONS = 1000  # distill.compile: null turns compilation on from this many iterations
# the methods whose distill.compile: null compiles long runs (each paired against eager by seed,
# with no significant accuracy change, BENCHMARKS.md); MTT has no compiled path
COMPILED_METHODS = ("dc", "dsa", "dm")
COMPILE_AUTO_EVAL_EPOCHS = 500  # eval.compile: null turns compilation on from this many evaluation epochs (DSA, DM: 1000)

# (outer_loop, inner_loop) of DC/DSA, Zhao et al.'s published table.
PUBLISHED_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def loops_for_ipc(ipc: int) -> tuple[int, int]:
    """DC/DSA outer and inner loop counts. Off the published table the same pattern continues:
    ``outer = min(ipc, 50)`` updates of the synthetic set per network, each followed by
    ``inner ~= 500 / ipc`` (clamped to 10..50) epochs of network training on it."""
    if ipc in PUBLISHED_LOOPS:
        return PUBLISHED_LOOPS[ipc]
    return min(ipc, 50), int(min(50, max(10, round(500 / ipc))))
