"""Yardstick only: one MTT step written the way GeorgeCazenavette/mtt-distillation's distill.py does it.

The student is a ``ReparamModule``-style wrapper (the network's parameters deleted and set, on
every forward, as views of one flat vector), the expert's parameters arrive as lists of tensors
and are flattened with ``torch.cat``, each step appends to ``student_params`` and pops the last
chunk of a ``torch.randperm`` split, and the loss is ``mse_loss(reduction="sum") / num_params``
over the same for the expert, as there; the augmentation is the reference's DiffAugment ops
(:mod:`reference_diffaug`). The random draws come from ``gen`` (ours' sampler, so that a test can
give ours the same ones); it is not part of the package.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ptmdd_ray import augment  # its sampler only: the draws the test shares with ours

from reference_diffaug import apply as diffaugment  # bench/: the reference's own ops


class ReparamStudent:
    """The reference's ``ReparamModule`` in short: ``net(x, flat_param)`` with views of ``flat_param``
    as the parameters."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.slots = []
        for _, m in net.named_modules():
            for n, p in list(m.named_parameters(recurse=False)):
                self.slots.append((m, n, p.shape, p.numel()))
        for m, n, _, _ in self.slots:
            delattr(m, n)
        self.num_params = sum(int(np.prod(shape)) for _, _, shape, _ in self.slots)

    def __call__(self, x: torch.Tensor, flat_param: torch.Tensor) -> torch.Tensor:
        offset = 0
        for m, n, shape, numel in self.slots:
            setattr(m, n, flat_param[offset:offset + numel].view(shape))
            offset += numel
        return self.net(x)


def reference_mtt_step(student_net: nn.Module, starting_params: list[torch.Tensor], target_params: list[torch.Tensor],
                       image_syn: torch.Tensor, label_syn: torch.Tensor, syn_lr: torch.Tensor, syn_steps: int,
                       batch_syn: int, strategy: str, gen: torch.Generator) -> torch.Tensor:
    """distill.py's inner loop for one expert segment; returns ``grand_loss`` (not yet backpropagated)."""
    student = ReparamStudent(student_net)
    criterion = nn.CrossEntropyLoss()
    target = torch.cat([p.data.reshape(-1) for p in target_params], 0)
    student_params = [torch.cat([p.data.reshape(-1) for p in starting_params], 0).requires_grad_(True)]
    starting = torch.cat([p.data.reshape(-1) for p in starting_params], 0)
    indices_chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not indices_chunks:
            indices = torch.randperm(len(image_syn), generator=gen)
            indices_chunks = list(torch.split(indices, batch_syn))
        these_indices = indices_chunks.pop()
        x = image_syn[these_indices]
        this_y = label_syn[these_indices]
        # DiffAugment (per image, one op drawn per call): the reference's ops on the values ours draws
        x = diffaugment(x, augment.sample(strategy, x.shape[0], x.shape[-1], gen, x.device))
        out = student(x, flat_param=student_params[-1])
        ce_loss = criterion(out, this_y)
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    param_loss = torch.nn.functional.mse_loss(student_params[-1], target, reduction="sum") / student.num_params
    param_dist = torch.nn.functional.mse_loss(starting, target, reduction="sum") / student.num_params
    return param_loss / param_dist
