"""Several networks of one ConvNet architecture trained as one grouped network.

Evaluating a synthetic set trains ``eval.runs`` fresh networks of each architecture on the same
few hundred images (the reference: 5 models x 1000 epochs). One such network at a time is a
sequence of small passes; R of them side by side are one pass of R-fold width: stacking their
channels, every ConvNet layer of the R models is one layer of the grouped network,

* a 3x3 convolution is one convolution with ``groups=R`` (the first, on each model's own batch,
  stays R convolutions: grouped convolutions over 1-3 input channels are slow in oneDNN),
* instance (group) norm over g groups of C channels is group norm over R*g groups of R*C channels,
* ReLU and pooling act per channel, as they are,
* the linear head is a batched matrix product,

and the R losses summed give every model exactly the gradient of its own loss. Each model keeps its
own seed, its own shuffle and its own DSA draws, from its own generator in the order
:func:`ptmdd_ray.train.train_classifier` draws them, and SGD is elementwise: a model trained in the
group equals the model trained alone up to float rounding (the convolution sums in another order;
``tests/test_grouped.py`` compares weights and accuracies). The grouped forward pass runs through
``torch.compile`` where inductor is available, which fuses the norm, activation and pooling passes
around the convolutions (float rounding differs again, ~1e-7 relative per pass).

Only ConvNet variants without BatchNorm are grouped (:func:`groupable`): BatchNorm keeps running
statistics that a functional pass would not carry back. Other architectures train one at a time.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import augment
from .archs import convnet_options
from .train import autocast, lr_at

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


def groupable(arch: str) -> bool:
    """Whether R networks of ``arch`` can train as one grouped network: ConvNet variants without
    BatchNorm (its running statistics are state a functional pass does not carry back)."""
    opts = convnet_options(arch)
    return opts is not None and opts.get("norm", "instancenorm") != "batchnorm"


def stack(models: Sequence[nn.Module]) -> Params:
    """The models' parameters stacked along a new first dimension, as fresh leaves."""
    names = [k for k, _ in models[0].named_parameters()]
    return {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]).requires_grad_()
            for k in names}


@torch.no_grad()
def unstack(params: Params, models: Sequence[nn.Module]) -> None:
    """Copy the stacked parameters back into the models (model r gets slice r)."""
    for r, m in enumerate(models):
        for k, p in m.named_parameters():
            p.copy_(params[k][r])


def grouped_forward(template: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits (R, N, K) of the R networks whose stacked parameters are ``params`` (``template``: one
    network of the architecture, read for its layers' kinds and settings only), model r on its own
    images ``x[r]`` (x: (R, N, C, H, W)). A pure function of its inputs, so ``torch.compile`` can
    take it whole."""
    r = x.shape[0]
    h = None
    for i, layer in enumerate(template.features):
        name = f"features.{i}"
        if isinstance(layer, nn.Conv2d):
            w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
            conv = functools.partial(F.conv2d, stride=layer.stride, padding=layer.padding)
            if h is None:  # first layer: each model's own images
                h = torch.cat([conv(x[j], w[j], None if b is None else b[j]) for j in range(r)], 1)
            else:
                h = conv(h, w.flatten(0, 1), None if b is None else b.flatten(), groups=r)
        elif isinstance(layer, nn.GroupNorm):
            h = F.group_norm(h, r * layer.num_groups, params[f"{name}.weight"].flatten(),
                             params[f"{name}.bias"].flatten(), layer.eps)
        elif isinstance(layer, nn.Flatten):
            h = h.reshape(h.shape[0], r, -1)
        elif isinstance(layer, (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.AvgPool2d, nn.MaxPool2d, nn.Identity)):
            h = layer(h)  # per channel: the same on R*C channels as on C
        else:
            raise TypeError(f"grouped_forward: no grouped form of {type(layer).__name__}")
    head_w, head_b = params["classifier.weight"], params["classifier.bias"]
    return torch.einsum("nrd,rkd->rnk", h, head_w) + head_b[:, None]


@functools.cache
def _compiled() -> Callable:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._inductor.config.compile_threads = 1  # see ptmdd_ray.compiled
    return torch.compile(grouped_forward, dynamic=False)


class GroupedNet:
    """R networks of one architecture as stacked parameters and a (compiled) grouped forward pass.
    Falls back to eager, with one warning, where inductor fails (no C++ compiler, say)."""

    def __init__(self, models: Sequence[nn.Module], compile: bool = True):
        self.models = list(models)
        self.template = models[0]
        self.params = stack(models)
        self._fn: Callable = _compiled() if compile else grouped_forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fn is not grouped_forward:
            try:
                return self._fn(self.template, self.params, x)
            except Exception as e:  # noqa: BLE001 - inductor's failures are many
                log.warning("torch.compile unavailable (%s: %s); grouped pass runs eager",
                            type(e).__name__, str(e)[:200])
                self._fn = grouped_forward
        return grouped_forward(self.template, self.params, x)

    def sync(self) -> list[nn.Module]:
        """The models, their weights set to the grouped training's."""
        unstack(self.params, self.models)
        return self.models


def train_group(
    net: GroupedNet,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gens: Sequence[torch.Generator],
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch: int,
    milestones: Sequence[int] = (),
    dsa_strategy: str = "none",
    precision: str = "bf16",
) -> GroupedNet:
    """:func:`ptmdd_ray.train.train_classifier` for the R models of ``net`` at once, model r drawing
    its shuffles and augmentations from ``gens[r]`` exactly as it would alone."""
    device, n, size, r = x.device, x.shape[0], x.shape[-1], len(net.models)
    if len(gens) != r:
        raise ValueError(f"train_group: {len(gens)} generators for {r} models")
    optimizer = torch.optim.SGD(list(net.params.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    amp = autocast(device, precision)
    for m in net.models:
        m.train()
    for ep in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(ep, lr, milestones)
        orders = [torch.randperm(n, generator=g).to(device) for g in gens]
        for start in range(0, n, batch):
            xs = []
            for g, order in zip(gens, orders):
                xb = x[order[start:start + batch]]
                xs.append(augment.apply(xb, augment.sample(dsa_strategy, xb.shape[0], size, g, device)))
            yb = torch.stack([y[order[start:start + batch]] for order in orders])
            with amp:
                logits = net(torch.stack(xs))
                loss = F.cross_entropy(logits.flatten(0, 1).float(), yb.flatten(), reduction="none")
            loss = loss.view(r, -1).mean(1).sum()  # each model's mean: its own gradient
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net


@torch.no_grad()
def group_accuracy(net: GroupedNet, x: torch.Tensor, y: torch.Tensor, batch: int = 1024,
                   precision: str = "bf16") -> list[float]:
    """Top-1 accuracy of each of the R models on (x, y), as fractions, one grouped pass per chunk."""
    r = len(net.models)
    correct = torch.zeros(r, dtype=torch.long, device=x.device)
    with autocast(x.device, precision):
        for start in range(0, x.shape[0], batch):
            xb = x[start:start + batch]
            logits = net(xb.unsqueeze(0).expand(r, *xb.shape))
            correct += (logits.argmax(-1) == y[start:start + batch]).sum(1)
    return (correct.double() / max(1, x.shape[0])).tolist()
