"""DC (gradient matching, Zhao et al., ICLR 2021) and DSA (the same with Siamese augmentation,
Zhao & Bilen, ICML 2021): per-class gradients of a network on real and synthetic images match,
and the network trains on the synthetic set between matchings."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import augment, losses
from ..compiled import CompiledCall
from ..config import DistillConfig
from ..models import has_batchnorm
from ..synthetic import RealSampler
from ..train import train_classifier
from .base import Guide


def _freeze_batchnorm(net: nn.Module, sampler: RealSampler, classes: int) -> None:
    """DC's treatment of BatchNorm: set the statistics from a real batch, then hold them fixed so
    that per-class batches (all one label) do not distort them."""
    if not has_batchnorm(net):
        return
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    net.train()
    with torch.no_grad():
        net(sampler.batch_all(16))
    for m in bns:
        m.eval()


def dc_step(net, syn, syn_y, sampler, cfg: DistillConfig, ipc: int, classes: int, gen, guide: Guide | None,
            update: Callable[[torch.Tensor], None], forward: CompiledCall | None = None, precision: str = "fp32"):
    """One DC/DSA iteration: ``outer_loop`` updates of the synthetic set, each matching per-class
    gradients of a network that is trained on the synthetic set in between (``inner_loop`` epochs,
    their steps through ``forward``, a compiled call, if given, under ``precision``: the inner loop
    is ~80 % of the eager iteration). The real images' gradients, the matching's targets, are a
    plain forward and backward, so they go through ``forward`` too (in fp32). The synthetic side
    differentiates through its gradients, a double backward that compiled graphs do not support,
    so it stays eager, and fp32."""
    params = list(net.parameters())
    opt_net = torch.optim.SGD(params, lr=cfg.lr_net)
    size = syn.shape[-1]
    out = []
    for ol in range(cfg.outer_loop):
        _freeze_batchnorm(net, sampler, classes)
        loss = syn.new_zeros(())
        syn_aug = []
        for c in range(classes):
            real = sampler.batch(c, cfg.batch_real)
            syn_c = syn[c * ipc:(c + 1) * ipc]
            aug = augment.sample(cfg.dsa_strategy, 1, size, gen, syn.device)
            real = augment.apply(real, aug, torch.zeros(real.shape[0], dtype=torch.long, device=syn.device))
            syn_c = augment.apply(syn_c, aug, torch.zeros(ipc, dtype=torch.long, device=syn.device))
            y_real = torch.full((real.shape[0],), c, device=syn.device)
            logits = net(real) if forward is None else forward(net, real)
            gw_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(logits, y_real), params)]
            gw_syn = torch.autograd.grad(F.cross_entropy(net(syn_c), syn_y[c * ipc:(c + 1) * ipc]), params,
                                         create_graph=True)
            loss = loss + losses.gradient_distance(gw_syn, gw_real)
            syn_aug.append(syn_c)
        if guide is not None:
            loss = loss + guide(torch.cat(syn_aug), syn, syn_y)
        update(loss)
        out.append(loss.detach())
        if ol == cfg.outer_loop - 1:
            break
        train_classifier(net, syn.detach(), syn_y, epochs=cfg.inner_loop, lr=cfg.lr_net, momentum=0.0,
                         weight_decay=0.0, batch=cfg.batch_train, dsa_strategy=cfg.dsa_strategy, gen=gen,
                         optimizer=opt_net, precision=precision, forward=forward)
    return out
