"""Distillation methods: DC (gradient matching), DSA (DC + Siamese augmentation), DM (distribution
matching), each optionally guided by a PTM pool (CLoM/CCLoM, see :mod:`ptmdd_ray.pool`).

One module per method family (:mod:`.dc` for DC and DSA, :mod:`.dm`), what they share in
:mod:`.base`, and the loop that runs any of them in :mod:`.loop`. Each iteration draws a freshly
initialised matching network, as in the original methods, so the synthetic set is optimised over
the distribution of initialisations rather than for one network. The PTM loss sees the raw
synthetic images, as in the reference code (``loss.augmented``: the augmented ones the matching
term sees). The loop never deep-copies the synthetic set; real features are computed without
grad; DM sends all classes through one batched forward.
"""
from ..errors import DivergenceError
from .base import Guide
from .dc import dc_step
from .dm import dm_step
from .loop import Distilled, DistillState, distill, pass_precision

__all__ = ["DivergenceError", "Distilled", "DistillState", "Guide", "dc_step", "distill", "dm_step",
           "pass_precision"]
