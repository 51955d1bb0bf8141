"""Yardstick only: DSA's augmentation ops written the way the reference ``DiffAugment`` does them
(``utils.py`` of GeorgeCazenavette/mtt-distillation, the DSA code's with ``align_corners=True``).

Each op below follows its ``rand_*`` function line by line, but takes the random values the
reference draws from torch's global generator as arguments (in the reference's units: uniforms in
[0, 1), integer shifts and offsets), so that a test can hand it the values ours drew and compare
the images. ``apply`` maps an :class:`ptmdd_ray.augment.AugParams` onto those arguments, one row
per image (the reference's ``batchmode`` False) or, with ``siamese``, the first row for all (its
``batchmode`` True). It is not part of the package.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PROB_FLIP, RATIO_SCALE, RATIO_ROTATE, RATIO_CROP_PAD, RATIO_CUTOUT = 0.5, 1.2, 15.0, 0.125, 0.5
BRIGHTNESS, SATURATION, CONTRAST = 1.0, 2.0, 0.5


def rand_scale(x, u_sx, u_sy):
    ratio = RATIO_SCALE
    sx = u_sx * (ratio - 1.0 / ratio) + 1.0 / ratio
    sy = u_sy * (ratio - 1.0 / ratio) + 1.0 / ratio
    theta = [[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(x.shape[0])]
    theta = torch.tensor(theta, dtype=torch.float)
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def rand_rotate(x, u):
    ratio = RATIO_ROTATE
    theta = (u - 0.5) * 2 * ratio / 180 * float(np.pi)
    theta = [[[torch.cos(theta[i]), torch.sin(-theta[i]), 0], [torch.sin(theta[i]), torch.cos(theta[i]), 0]]
             for i in range(x.shape[0])]
    theta = torch.tensor(theta, dtype=torch.float)
    grid = F.affine_grid(theta, x.shape, align_corners=True).to(x.device)
    return F.grid_sample(x, grid, align_corners=True)


def rand_flip(x, u):
    randf = u.view(x.size(0), 1, 1, 1)
    return torch.where(randf < PROB_FLIP, x.flip(3), x)


def rand_brightness(x, u):
    randb = u.view(x.size(0), 1, 1, 1).to(x.dtype)
    return x + (randb - 0.5) * BRIGHTNESS


def rand_saturation(x, u):
    x_mean = x.mean(dim=1, keepdim=True)
    rands = u.view(x.size(0), 1, 1, 1).to(x.dtype)
    return (x - x_mean) * (rands * SATURATION) + x_mean


def rand_contrast(x, u):
    x_mean = x.mean(dim=[1, 2, 3], keepdim=True)
    randc = u.view(x.size(0), 1, 1, 1).to(x.dtype)
    return (x - x_mean) * (randc + CONTRAST) + x_mean


def rand_crop(x, translation_x, translation_y):
    translation_x, translation_y = translation_x.view(-1, 1, 1), translation_y.view(-1, 1, 1)
    grid_batch, grid_x, grid_y = torch.meshgrid(
        torch.arange(x.size(0), dtype=torch.long, device=x.device),
        torch.arange(x.size(2), dtype=torch.long, device=x.device),
        torch.arange(x.size(3), dtype=torch.long, device=x.device), indexing="ij")
    grid_x = torch.clamp(grid_x + translation_x + 1, 0, x.size(2) + 1)
    grid_y = torch.clamp(grid_y + translation_y + 1, 0, x.size(3) + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_batch, grid_x, grid_y].permute(0, 3, 1, 2)


def rand_cutout(x, offset_x, offset_y):
    cutout_size = int(x.size(2) * RATIO_CUTOUT + 0.5), int(x.size(3) * RATIO_CUTOUT + 0.5)
    offset_x, offset_y = offset_x.view(-1, 1, 1), offset_y.view(-1, 1, 1)
    grid_batch, grid_x, grid_y = torch.meshgrid(
        torch.arange(x.size(0), dtype=torch.long, device=x.device),
        torch.arange(cutout_size[0], dtype=torch.long, device=x.device),
        torch.arange(cutout_size[1], dtype=torch.long, device=x.device), indexing="ij")
    grid_x = torch.clamp(grid_x + offset_x - cutout_size[0] // 2, min=0, max=x.size(2) - 1)
    grid_y = torch.clamp(grid_y + offset_y - cutout_size[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype, device=x.device)
    mask[grid_batch, grid_x, grid_y] = 0
    return x * mask.unsqueeze(1)


def apply(x: torch.Tensor, params, siamese: bool = False) -> torch.Tensor:
    """The reference's op on ``x`` with the values of ``params`` (a ``ptmdd_ray.augment.AugParams``
    drawn for ``len(x)`` groups, or for one with ``siamese``)."""
    if params is None:
        return x
    n = x.shape[0]
    v = {k: (t[:1].expand(n) if siamese else t).cpu() for k, t in params.values.items()}
    if params.op == "color":
        return rand_contrast(rand_saturation(rand_brightness(x, v["brightness"]), v["saturation"]), v["contrast"])
    if params.op == "crop":
        return rand_crop(x, v["tx"], v["ty"])
    if params.op == "cutout":
        return rand_cutout(x, v["ox"], v["oy"])
    if params.op == "flip":
        return rand_flip(x, v["flip"])
    if params.op == "scale":
        return rand_scale(x, v["sx"], v["sy"])
    return rand_rotate(x, v["theta"])
