"""What every distillation method shares: the guide's signature, frozen matching networks and the
per-class grouping of a batch."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

# guide(augmented synthetic images, raw synthetic images, labels) -> weighted PTM loss
Guide = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def frozen(net: nn.Module) -> nn.Module:
    """``net`` with its weights out of autograd: DM matches through a random network, never trains it."""
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def groups(classes: int, per_class: int, device) -> torch.Tensor:
    """The class of each image of a class-major batch: DSA draws one augmentation per class group."""
    return torch.arange(classes, device=device).repeat_interleave(per_class)
