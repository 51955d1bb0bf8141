"""Yardstick only: one DM (+CLoM) iteration written the way the original DM / paper code does it.

Per-class forward passes of real and synthetic images, the loss accumulated class by class, a
fresh ``np.random.permutation`` of the class's indices per batch, and CLoM on the un-augmented
synthetic set. It exists so ``bench_distill.py`` can report our DM step as a ratio against it in
the same process; it is not part of the package.
"""
from __future__ import annotations

import numpy as np
import torch

from ptmdd_ray import augment, losses


def reference_dm_iteration(net, syn, syn_y, images_all, indices_class, opt, ipc, batch_real, strategy,
                           clom_ptm=None, alpha=0.0):
    for p in net.parameters():
        p.requires_grad = False
    net.train()
    classes = len(indices_class)
    device = syn.device  # the original: torch.tensor(0.0).to(args.device), parameters sent to the device
    loss = torch.tensor(0.0, device=device)
    for c in range(classes):
        idx = np.random.permutation(indices_class[c])[:batch_real]
        img_real = images_all[idx]
        img_syn = syn[c * ipc:(c + 1) * ipc]
        params = augment.sample(strategy, 1, syn.shape[-1], device=device)
        img_real = augment.apply(img_real, params, torch.zeros(img_real.shape[0], dtype=torch.long, device=device))
        img_syn = augment.apply(img_syn, params, torch.zeros(ipc, dtype=torch.long, device=device))
        output_real = net.embed(img_real).detach()
        output_syn = net.embed(img_syn)
        loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
    if clom_ptm is not None:
        loss += alpha * losses.clom(clom_ptm(syn), syn_y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()
