"""The maths of distillation, as pure functions of tensors.

- :func:`gradient_distance`: DC's layer-wise matching distance between two gradient lists.
- :func:`distribution_distance`: DM's squared distance between per-class mean embeddings.
- :func:`clom`: CLoM, the cross-entropy of a pre-trained model's logits on the synthetic images.
- :func:`cclom`: CCLoM, the contrastive cosine loss between pre-trained-model embeddings of the
  synthetic images and of a real batch; it needs no classifier head in the target label space.

Weights (alpha, beta) are applied by the caller; these functions are the unweighted definitions.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _layer_distance(g_syn: torch.Tensor, g_real: torch.Tensor) -> torch.Tensor:
    """Sum over output units of (1 - cosine similarity) between the two gradients.

    Gradients are grouped per output channel/unit (DC, Zhao et al. 2021, eq. 7); 1-D parameters
    (biases, norm affines) are ignored, as in the reference 'ours' metric."""
    if g_real.dim() == 1:
        return g_real.new_zeros(())
    g_real = g_real.reshape(g_real.shape[0], -1)
    g_syn = g_syn.reshape(g_syn.shape[0], -1)
    dot = (g_real * g_syn).sum(-1)
    norms = g_real.norm(dim=-1) * g_syn.norm(dim=-1) + 1e-6
    return (1 - dot / norms).sum()


def gradient_distance(gw_syn: Sequence[torch.Tensor], gw_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """DC gradient-matching distance summed over layers."""
    return sum((_layer_distance(s, r) for s, r in zip(gw_syn, gw_real)), gw_real[0].new_zeros(()))


def distribution_distance(syn_mean: torch.Tensor, real_mean: torch.Tensor) -> torch.Tensor:
    """DM distance: sum over classes and feature dims of the squared difference of the class-mean
    embeddings, shape (classes, dim) each (Zhao & Bilen 2023, eq. 4 with an empirical MMD)."""
    return ((real_mean - syn_mean) ** 2).sum()


def clom(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CLoM (Lu et al. 2023): mean cross-entropy of a PTM's logits on the synthetic images against
    their labels. It asks the synthetic set to be classified correctly by models that learned the
    real data, i.e. to hold the features such models rely on."""
    return F.cross_entropy(logits, labels)


def cclom(syn_feat: torch.Tensor, real_feat: torch.Tensor, syn_labels: torch.Tensor,
          real_labels: torch.Tensor) -> torch.Tensor:
    """CCLoM (Lu et al. 2023): contrastive cosine loss in a PTM's embedding space.

    D[i, j] = 1 - cos(syn_i, real_j); M[i, j] = 1 where the labels agree. Loss = sum(M * D) / sum(D):
    the share of total cosine distance that lies between same-label pairs, so minimising it pulls
    each synthetic image towards real images of its class relative to all others. Only embeddings
    are used, so the PTM may come from another label space."""
    s = F.normalize(syn_feat, dim=-1)
    r = F.normalize(real_feat, dim=-1)
    dist = 1 - s @ r.t()
    mask = (syn_labels[:, None] == real_labels[None, :]).to(dist.dtype)
    return (mask * dist).sum() / dist.sum().clamp_min(1e-12)
