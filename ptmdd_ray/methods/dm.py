"""DM (distribution matching, Zhao & Bilen, WACV 2023): the synthetic images' mean embedding under
a random network matches the real images' class by class; all classes go through one batched
forward."""
from __future__ import annotations

import torch

from .. import augment, losses
from ..compiled import CompiledCall
from ..config import DistillConfig
from ..models import embed_chunked
from ..train import autocast
from .base import Guide, frozen, groups


def dm_step(net, syn, syn_y, sampler, cfg: DistillConfig, ipc: int, classes: int, gen, guide: Guide | None,
            embed: CompiledCall | None = None, precision: str = "fp32"):
    """One DM update: match class-mean embeddings of real and synthetic images under a random net
    (its passes through ``embed``, a compiled call, if given, under ``precision``'s autocast; the
    distance itself is fp32)."""
    frozen(net).train()
    real = sampler.batch_all(cfg.batch_real)
    per = real.shape[0] // classes
    params = augment.sample(cfg.dsa_strategy, classes, syn.shape[-1], gen, syn.device)
    real_aug = augment.apply(real, params, groups(classes, per, syn.device))
    syn_aug = augment.apply(syn, params, groups(classes, ipc, syn.device))
    with autocast(syn.device, precision):
        with torch.no_grad():
            real_feat = embed_chunked(net, real_aug, embed)
        syn_feat = embed_chunked(net, syn_aug, embed)
    loss = losses.distribution_distance(
        syn_feat.float().view(classes, ipc, -1).mean(1), real_feat.float().view(classes, per, -1).mean(1))
    if guide is not None:
        loss = loss + guide(syn_aug, syn, syn_y)
    return loss
