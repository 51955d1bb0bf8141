"""Yardstick only: one DC / DSA (+CLoM) iteration written the way the original DC/DSA code does it.

Zhao et al.'s ``main.py`` loop: per outer loop, BatchNorm statistics set from a real batch, then
per class a fresh ``np.random.permutation`` batch, one Siamese augmentation draw (DSA), a forward
and gradient of the real batch (detached and cloned), a forward and create-graph gradient of the
synthetic class, the layer-by-layer matching distance accumulated into one loss; CLoM on the
un-augmented synthetic set (the paper's code). Between outer loops the network is trained on a
``copy.deepcopy`` of the synthetic set through a ``TensorDataset``/``DataLoader``, with
``loss.item()`` and a numpy accuracy per batch as the original ``epoch()`` does. It exists so
``bench_distill.py`` can report our DC/DSA iteration as a ratio against it in the same process;
it is not part of the package.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from ptmdd_ray import augment, losses


def _distance_wb(gwr: torch.Tensor, gws: torch.Tensor) -> torch.Tensor:
    """The original ``distance_wb``: per output unit 1 - cosine, biases ignored."""
    shape = gwr.shape
    if len(shape) == 4:
        gwr = gwr.reshape(shape[0], shape[1] * shape[2] * shape[3])
        gws = gws.reshape(shape[0], shape[1] * shape[2] * shape[3])
    elif len(shape) == 3:
        gwr = gwr.reshape(shape[0], shape[1] * shape[2])
        gws = gws.reshape(shape[0], shape[1] * shape[2])
    elif len(shape) == 1:
        return torch.tensor(0.0, device=gwr.device)
    return torch.sum(1 - torch.sum(gwr * gws, dim=-1)
                     / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + 0.000001))


def _match_loss(gw_syn, gw_real) -> torch.Tensor:
    dis = torch.tensor(0.0, device=gw_real[0].device)
    for ig in range(len(gw_real)):
        dis += _distance_wb(gw_real[ig], gw_syn[ig])
    return dis


def _epoch(loader, net, optimizer, criterion, strategy, size):
    net.train()
    loss_avg = acc_avg = num_exp = 0
    for img, lab in loader:
        img = img.float()
        if strategy != "none":
            params = augment.sample(strategy, img.shape[0], size, device=img.device)
            img = augment.apply(img, params)
        lab = lab.long()
        output = net(img)
        loss = criterion(output, lab)
        acc_avg += np.sum(np.equal(np.argmax(output.cpu().data.numpy(), axis=-1), lab.cpu().data.numpy()))
        loss_avg += loss.item() * lab.shape[0]
        num_exp += lab.shape[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss_avg / num_exp, acc_avg / num_exp


def reference_dc_iteration(net, syn, syn_y, images_all, indices_class, opt_img, ipc, batch_real, strategy,
                           outer_loop, inner_loop, lr_net, batch_train, clom_ptm=None, alpha=0.0):
    """One outer iteration of DC (``strategy == "none"``) or DSA on a fresh ``net``."""
    net.train()
    params = list(net.parameters())
    opt_net = torch.optim.SGD(net.parameters(), lr=lr_net)
    criterion = nn.CrossEntropyLoss()
    classes, size = len(indices_class), syn.shape[-1]
    device = syn.device  # the original sends every tensor to args.device

    def get_images(c, n):
        return images_all[np.random.permutation(indices_class[c])[:n]]

    loss_avg = 0.0
    for ol in range(outer_loop):
        if any("BatchNorm" in m._get_name() for m in net.modules()):
            img_real = torch.cat([get_images(c, 16) for c in range(classes)], dim=0)
            net.train()
            net(img_real)
            for m in net.modules():
                if "BatchNorm" in m._get_name():
                    m.eval()
        loss = torch.tensor(0.0, device=device)
        for c in range(classes):
            img_real = get_images(c, batch_real)
            lab_real = torch.ones((img_real.shape[0],), dtype=torch.long, device=device) * c
            img_syn = syn[c * ipc:(c + 1) * ipc].reshape((ipc, syn.shape[1], size, size))
            lab_syn = torch.ones((ipc,), dtype=torch.long, device=device) * c
            if strategy != "none":
                aug = augment.sample(strategy, 1, size, device=device)
                img_real = augment.apply(img_real, aug, torch.zeros(img_real.shape[0], dtype=torch.long, device=device))
                img_syn = augment.apply(img_syn, aug, torch.zeros(ipc, dtype=torch.long, device=device))
            gw_real = torch.autograd.grad(criterion(net(img_real), lab_real), params)
            gw_real = list(g.detach().clone() for g in gw_real)
            gw_syn = torch.autograd.grad(criterion(net(img_syn), lab_syn), params, create_graph=True)
            loss += _match_loss(gw_syn, gw_real)
        if clom_ptm is not None:
            loss += alpha * losses.clom(clom_ptm(syn), syn_y)
        opt_img.zero_grad()
        loss.backward()
        opt_img.step()
        loss_avg += loss.item()
        if ol == outer_loop - 1:
            break
        syn_train, y_train = copy.deepcopy(syn.detach()), copy.deepcopy(syn_y.detach())
        loader = DataLoader(TensorDataset(syn_train, y_train), batch_size=batch_train, shuffle=True, num_workers=0)
        for _ in range(inner_loop):
            _epoch(loader, net, opt_net, criterion, strategy, size)
    return loss_avg / (classes * outer_loop)
