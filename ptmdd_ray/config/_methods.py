"""What the papers fixed: the published defaults of DC, DSA and DM, DC's loop table and DSA's ops.

A config leaves a setting ``None`` to mean "the published default for the chosen method";
:func:`~ptmdd_ray.config.resolve` fills it from here, so the resolved config records what ran.
The tables are plain data (no torch): :mod:`ptmdd_ray.methods` and :mod:`ptmdd_ray.augment` read
the same ones.
"""
from __future__ import annotations

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
REFERENCE_EVAL_RUNS = 5  # models per architecture in the reference's evaluation (its runs: 5 to 20)
COMPILE_AUTO_ITERATIONS = 1000  # distill.compile: null turns compilation on from this many DM iterations
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
