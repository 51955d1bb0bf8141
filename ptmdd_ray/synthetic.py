"""Where a synthetic set starts, and the real images it is matched against: per-class batches of
real training images drawn from one seeded generator (:class:`RealSampler`), and the initial set
(:func:`init_synthetic`), random real images or noise.

Distillation (:mod:`ptmdd_ray.methods`) and the random-real baseline (:mod:`ptmdd_ray.evaluate`)
both draw from here: the baseline's subset is drawn the way a ``real``-initialised set is (from
its own seed).
"""
from __future__ import annotations

import torch

from .data import ImageData


class RealSampler:
    """Seeded per-class batches of real images."""

    def __init__(self, data: ImageData, gen: torch.Generator):
        self.x = data.x_train
        self.indices = [i.to(self.x.device) for i in data.class_indices()]
        self.gen = gen

    def batch(self, c: int, n: int) -> torch.Tensor:
        idx = self.indices[c]
        pick = torch.randperm(idx.numel(), generator=self.gen)[: min(n, idx.numel())]
        return self.x[idx[pick.to(idx.device)]]

    def batch_all(self, n: int) -> torch.Tensor:
        """``n`` images of every class, class-major: shape (classes * n, C, H, W)."""
        n = min(n, min(i.numel() for i in self.indices))
        return torch.cat([self.batch(c, n) for c in range(len(self.indices))])


def init_synthetic(data: ImageData, ipc: int, init: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` images per class, class-major: random real images (``real``) or N(0, 1) noise."""
    labels = torch.arange(data.num_classes).repeat_interleave(ipc)
    if init == "real":
        sampler = RealSampler(data, gen)
        images = torch.cat([sampler.batch(c, ipc) for c in range(data.num_classes)]).cpu()
    else:
        images = torch.randn((labels.numel(), data.channels, data.im_size, data.im_size), generator=gen)
    return images.float().clone(), labels
