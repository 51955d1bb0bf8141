"""Distillation methods: DC (gradient matching), DSA (DC + Siamese augmentation), DM (distribution
matching) and MTT (trajectory matching), each optionally guided by a PTM pool (CLoM/CCLoM, see
:mod:`ptmdd_ray.pool`).

One module per method family (:mod:`.dc` for DC and DSA, :mod:`.dm`, :mod:`.mtt`), what they share
in :mod:`.base`, and the loop that runs any of them in :mod:`.loop`. Each DC/DSA/DM iteration draws a
freshly initialised matching network, as in the original methods, so the synthetic set is optimised
over the distribution of initialisations rather than for one network; MTT's starts from an expert's
stored epoch instead. The PTM loss sees the raw synthetic images, as in the reference code
(``loss.augmented``: the augmented ones the matching term sees; for MTT, one DSA draw of the set). The loop never deep-copies the synthetic set; real features are computed without
grad; DM sends all classes through one batched forward.
"""
from ..errors import DivergenceError
from .base import Guide
from .dc import dc_step
from .dm import dm_step
from .loop import Distilled, DistillState, distill, pass_precision
from .mtt import Trajectory, trajectory_loss, trajectory_loss_recomputed

__all__ = ["DivergenceError", "Distilled", "DistillState", "Guide", "Trajectory", "dc_step", "distill", "dm_step",
           "pass_precision", "trajectory_loss", "trajectory_loss_recomputed"]
