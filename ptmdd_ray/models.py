"""Model zoo: the standard Dataset Condensation networks (DC / DSA / DM, Zhao et al.).

Every model is a :class:`Net`: a ``features`` trunk that ends in a flat ``(N, D)`` vector
(``embed``), followed by one ``nn.Linear`` ``classifier``, so ``forward(x) ==
classifier(embed(x))``. Distribution matching needs ``embed``; gradient matching and
evaluation need ``forward``; keeping both on one shape makes every method arch-agnostic.

Names are parsed, not enumerated, in :mod:`ptmdd_ray.archs` (torch-free, so the config checks
them without torch): fixed families have a builder in :data:`_BUILDERS`, and ConvNet variants
(``ConvNetD4``, ``ConvNetW64``, ``ConvNetBN``, ``ConvNetD4W64MP`` ...) are parsed into the
ConvNet builder's options. Spatial sizes are computed arithmetically from ``im_size`` (no dry run, so no
BatchNorm statistics are touched at construction), and any 2x2 pooling that would act on a
map smaller than 2 px is replaced by ``nn.Identity`` so every size in 8..64 px works while
layer indices (and therefore state-dict keys) stay the same across sizes.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import nn

from .archs import FAMILIES, ModelSpecError, available, convnet_options, is_known


# Instance norm is the DD default (DC code spells it GroupNorm(C, C)): statistics are per
# sample, so a network's output on one image never depends on the rest of the batch. BN's
# batch coupling would make per-class real/synthetic gradient matching depend on batch
# composition and train/eval mode. GroupNorm(4, C) falls back to gcd(4, C) groups so any width works.
_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "instancenorm": lambda c: nn.GroupNorm(c, c, affine=True),
    "batchnorm": nn.BatchNorm2d,
    "layernorm": lambda c: nn.GroupNorm(1, c, affine=True),  # over channels + space: size-independent
    "groupnorm": lambda c: nn.GroupNorm(math.gcd(4, c), c, affine=True),
    "none": lambda c: nn.Identity(),
}
_ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "sigmoid": nn.Sigmoid,
    "leakyrelu": lambda: nn.LeakyReLU(0.01, inplace=True),
}
_POOLS: dict[str, Callable[[], nn.Module] | None] = {
    "avgpooling": lambda: nn.AvgPool2d(2, 2),
    "maxpooling": lambda: nn.MaxPool2d(2, 2),
    "none": None,
}


def _pool(kind: str, size: int) -> tuple[nn.Module, int]:
    """A 2x2/stride-2 pool and the new spatial size; Identity when absent or size < 2."""
    make = _POOLS[kind]
    if make is None or size < 2:
        return nn.Identity(), size
    return make(), size // 2


class Net(nn.Module):
    """``features`` (image -> (N, feature_dim)) followed by a linear ``classifier``."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.feature_dim = int(feature_dim)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape (N, feature_dim)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# ---------------------------------------------------------------------------------------------
# Builders: (channels, num_classes, im_size, **options) -> Net


def _convnet(channels, num_classes, im_size, width=128, depth=3, norm="instancenorm",
             act="relu", pool="avgpooling"):
    """DC ConvNet: depth x [conv3x3 -> norm -> act -> pool 2x2], flatten, linear."""
    layers, c, s = [], channels, im_size
    for _ in range(depth):
        p, s = _pool(pool, s)
        layers += [nn.Conv2d(c, width, 3, padding=1), _NORMS[norm](width), _ACTS[act](), p]
        c = width
    return Net(nn.Sequential(*layers, nn.Flatten()), width * s * s, num_classes)


def _mlp(channels, num_classes, im_size):
    """DC MLP: two 128-unit ReLU layers; embed is the second hidden layer."""
    features = nn.Sequential(nn.Flatten(), nn.Linear(channels * im_size * im_size, 128),
                             nn.ReLU(inplace=True), nn.Linear(128, 128), nn.ReLU(inplace=True))
    return Net(features, 128, num_classes)


def _lenet(channels, num_classes, im_size):
    """LeNet-5 (DC version). Grayscale keeps size with padding 2 on conv1 (28 -> 28, as in
    DC); otherwise a 5x5 conv is unpadded unless that would leave < 2 px for its pool (tiny
    inputs), in which case it is padded 2 (size-preserving)."""
    layers, c, s = [], channels, im_size
    for i, out in enumerate((6, 16)):
        pad = 2 if (i == 0 and channels == 1) or s < 6 else 0
        s = s + 2 * pad - 4
        p, s = _pool("maxpooling", s)
        layers += [nn.Conv2d(c, out, 5, padding=pad), nn.ReLU(inplace=True), p]
        c = out
    layers += [nn.Flatten(), nn.Linear(16 * s * s, 120), nn.ReLU(inplace=True),
               nn.Linear(120, 84), nn.ReLU(inplace=True)]
    return Net(nn.Sequential(*layers), 84, num_classes)


# (out channels, kernel, padding, maxpool after); every conv preserves spatial size.
_ALEXNET_CFG = [(128, 5, 2, True), (192, 5, 2, True), (256, 3, 1, False),
                (192, 3, 1, False), (192, 3, 1, True)]


def _alexnet(channels, num_classes, im_size, bn=False):
    """DC AlexNet (32 px design); AlexNetBN adds BatchNorm2d after every conv."""
    layers, c, s = [], channels, im_size
    for out, k, pad, pool in _ALEXNET_CFG:
        layers += [nn.Conv2d(c, out, k, padding=pad),
                   nn.BatchNorm2d(out) if bn else nn.Identity(), nn.ReLU(inplace=True)]
        if pool:
            p, s = _pool("maxpooling", s)
            layers.append(p)
        c = out
    return Net(nn.Sequential(*layers, nn.Flatten()), c * s * s, num_classes)


_VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def _vgg11(channels, num_classes, im_size, norm="instancenorm"):
    """DC VGG11: conv3x3 -> norm -> ReLU blocks with 5 max-pools, single linear head."""
    layers, c, s = [], channels, im_size
    for v in _VGG11_CFG:
        if v == "M":
            p, s = _pool("maxpooling", s)
            layers.append(p)
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), _NORMS[norm](v), nn.ReLU(inplace=True)]
            c = v
    return Net(nn.Sequential(*layers, nn.Flatten()), c * s * s, num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block. ``ap=True`` is DC's BasicBlock_AP: convs stay stride 1 and the
    downsampling is an AvgPool2d(2) on both branches (smoother gradients w.r.t. pixels)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, ap: bool, size: int):
        super().__init__()
        down = stride != 1
        pool = nn.AvgPool2d(2, 2) if ap and down and size >= 2 else nn.Identity()
        conv_stride = 1 if ap else stride
        self.conv1 = nn.Conv2d(cin, cout, 3, conv_stride, 1, bias=False)
        self.norm1 = _NORMS[norm](cout)
        self.pool = pool
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _NORMS[norm](cout)
        self.shortcut = nn.Identity()
        if down or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, conv_stride, bias=False),
                                          nn.AvgPool2d(2, 2) if isinstance(pool, nn.AvgPool2d)
                                          else nn.Identity(), _NORMS[norm](cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.relu(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _resnet18(channels, num_classes, im_size, norm="instancenorm", ap=False):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool); global average pool -> 512-d embed.
    Stride-2 convs map 1 px to 1 px, and AP blocks skip pooling below 2 px, so 8 px works."""
    layers = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), _NORMS[norm](64), nn.ReLU(inplace=True)]
    c, s = 64, im_size
    for i, width in enumerate((64, 128, 256, 512)):
        blocks = []
        for j in range(2):
            stride = 2 if i > 0 and j == 0 else 1
            blocks.append(BasicBlock(c, width, stride, norm, ap, s))
            if stride == 2:
                s = (s // 2 if s >= 2 else s) if ap else (s + 1) // 2
            c = width
        layers.append(nn.Sequential(*blocks))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Net(nn.Sequential(*layers), c, num_classes)


# ---------------------------------------------------------------------------------------------
# Registry: a builder per fixed family of :data:`ptmdd_ray.archs.FAMILIES`, ConvNet variants by parse

_BUILDERS: dict[str, Callable[..., Net]] = {
    "MLP": _mlp,
    "LeNet": _lenet,
    "AlexNet": _alexnet,
    "AlexNetBN": partial(_alexnet, bn=True),
    "VGG11": _vgg11,
    "VGG11BN": partial(_vgg11, norm="batchnorm"),
    "ResNet18": _resnet18,
    "ResNet18BN": partial(_resnet18, norm="batchnorm"),
    "ResNet18BN_AP": partial(_resnet18, norm="batchnorm", ap=True),
}
assert tuple(_BUILDERS) == FAMILIES, "archs.FAMILIES and models._BUILDERS name the same families"


def _builder(name: str) -> Callable[..., Net] | None:
    if not is_known(name):
        return None
    return _BUILDERS.get(name) or partial(_convnet, **convnet_options(name))


def build_model(name: str, channels: int, num_classes: int, im_size: int) -> nn.Module:
    """Build architecture ``name`` for (N, channels, im_size, im_size) inputs, in train mode."""
    builder = _builder(name)
    if builder is None:
        raise ModelSpecError(f"unknown architecture {name!r} (known: {', '.join(available())})")
    for arg, value in (("channels", channels), ("num_classes", num_classes), ("im_size", im_size)):
        if not isinstance(value, int) or value < 1:
            raise ModelSpecError(f"{arg} must be a positive int, got {value!r}")
    return builder(channels, num_classes, im_size)


def has_batchnorm(net: nn.Module) -> bool:
    """Whether ``net`` couples the images of a batch (BatchNorm in train mode does)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


# On the CPU a forward pass is memory-bound: feeding ~128 images at a time keeps activations in
# cache and runs ~2x faster than one 640-image batch (bench/bench_distill.py). GPUs want the
# whole batch at once.
CPU_CHUNK = 128


def embed_chunked(net: nn.Module, x: torch.Tensor,
                  embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``net.embed(x)`` (through ``embed``, a compiled call, if given), in cache-sized chunks on the
    CPU (identical result: the matching nets normalise per sample, and BatchNorm nets are never
    chunked)."""
    call = (lambda c: embed(net, c)) if embed is not None else net.embed
    if x.device.type != "cpu" or x.shape[0] <= CPU_CHUNK or has_batchnorm(net):
        return call(x)
    return torch.cat([call(c) for c in x.split(CPU_CHUNK)])
