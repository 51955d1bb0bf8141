"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021).

Every op is differentiable in the images, so gradients reach the synthetic pixels through it. DSA is
*Siamese*: the real and the synthetic batch of one class see the same transformation, so the matching
loss compares like with like. Here that is explicit: :func:`sample` draws parameters for ``groups``
groups and :func:`apply` gives every image the parameters of its group. One group per class gives
the Siamese per-class augmentation of DC/DSA/DM (one batched call for all classes); one group per
image gives the independent augmentation used when training evaluation networks.

As in the reference implementation, a strategy ``a_b_c`` applies one op drawn uniformly per call;
``color`` is brightness, saturation and contrast in sequence; ``crop`` is a translation by up to
1/8 of the image with zero padding. Default magnitudes are those of the DSA paper's ``ParamDiffAug``.
The op names and the strategy check are torch-free, in :mod:`ptmdd_ray.config` (the config checks
``distill.dsa_strategy`` with them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DSA_OPS, check_strategy

SCALE = 1.2
ROTATE_DEG = 15.0
CROP_RATIO = 0.125
CUTOUT_RATIO = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5


@dataclass(frozen=True)
class AugParams:
    """One op and its random values, one row per group."""

    op: str
    values: dict[str, torch.Tensor]


def _uniform(n: int, gen: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=gen).to(device)


def sample(strategy: str, groups: int, size: int, gen: torch.Generator | None = None, device="cpu") -> AugParams | None:
    """Draw one op of ``strategy`` and its parameters for ``groups`` groups (None for ``"none"``).

    Random numbers come from ``gen`` on the CPU, so a seeded run is reproducible on any device."""
    ops = check_strategy(strategy)
    if not ops:
        return None
    op = ops[int(torch.randint(len(ops), (1,), generator=gen))]
    u = lambda: _uniform(groups, gen, device)  # noqa: E731
    if op == "color":
        values = {"brightness": u(), "saturation": u(), "contrast": u()}
    elif op == "crop":
        shift = int(size * CROP_RATIO + 0.5)
        values = {
            "tx": torch.randint(-shift, shift + 1, (groups,), generator=gen).to(device),
            "ty": torch.randint(-shift, shift + 1, (groups,), generator=gen).to(device),
        }
    elif op == "cutout":
        cut = int(size * CUTOUT_RATIO + 0.5)
        hi = size + (1 - cut % 2)
        values = {
            "ox": torch.randint(0, hi, (groups,), generator=gen).to(device),
            "oy": torch.randint(0, hi, (groups,), generator=gen).to(device),
        }
    elif op == "flip":
        values = {"flip": u()}
    elif op == "scale":
        values = {"sx": u(), "sy": u()}
    else:  # rotate
        values = {"theta": u()}
    return AugParams(op, values)


def apply(x: torch.Tensor, params: AugParams | None, group: torch.Tensor | None = None) -> torch.Tensor:
    """Augment ``x`` (N, C, H, W); image i uses the parameters of group ``group[i]``
    (default: group i, i.e. independent per-image parameters)."""
    if params is None:
        return x
    v = params.values if group is None else {k: t[group] for k, t in params.values.items()}
    return _APPLY[params.op](x, v)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x, v):
    lo = 1.0 / SCALE
    sx = v["sx"] * (SCALE - lo) + lo
    sy = v["sy"] * (SCALE - lo) + lo
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta.to(x.dtype))


def _rotate(x, v):
    t = (v["theta"] - 0.5) * 2 * ROTATE_DEG / 180 * math.pi
    c, s, zero = torch.cos(t), torch.sin(t), torch.zeros_like(t)
    theta = torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1)], 1)
    return _affine(x, theta.to(x.dtype))


def _flip(x, v):
    return torch.where((v["flip"] < 0.5).view(-1, 1, 1, 1), x.flip(3), x)


def _color(x, v):
    x = x + (v["brightness"].view(-1, 1, 1, 1).to(x.dtype) - 0.5) * BRIGHTNESS
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (v["saturation"].view(-1, 1, 1, 1).to(x.dtype) * SATURATION) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (v["contrast"].view(-1, 1, 1, 1).to(x.dtype) + CONTRAST) + mean


def _crop(x, v):
    """Translate by (tx, ty) whole pixels, filling with zeros (a gather on a 1-pixel zero pad)."""
    n, _, h, w = x.shape
    dev = x.device
    gi = torch.arange(h, device=dev).view(1, h, 1) + v["tx"].view(-1, 1, 1) + 1
    gj = torch.arange(w, device=dev).view(1, 1, w) + v["ty"].view(-1, 1, 1) + 1
    gi = gi.clamp(0, h + 1).expand(n, h, w)
    gj = gj.clamp(0, w + 1).expand(n, h, w)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    b = torch.arange(n, device=dev).view(n, 1, 1)
    return padded[b, gi, gj].permute(0, 3, 1, 2)


def _cutout(x, v):
    n, _, h, w = x.shape
    cut = int(h * CUTOUT_RATIO + 0.5)
    dev = x.device
    ci = torch.arange(cut, device=dev).view(1, cut, 1) + v["ox"].view(-1, 1, 1) - cut // 2
    cj = torch.arange(cut, device=dev).view(1, 1, cut) + v["oy"].view(-1, 1, 1) - cut // 2
    ci = ci.clamp(0, h - 1).expand(n, cut, cut)
    cj = cj.clamp(0, w - 1).expand(n, cut, cut)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=dev)
    mask[torch.arange(n, device=dev).view(n, 1, 1), ci, cj] = 0
    return x * mask.unsqueeze(1)


_APPLY = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}
assert tuple(_APPLY) == DSA_OPS, "config.DSA_OPS names the ops implemented here"
