"""Training networks on tensors: PTM pretraining, evaluation of synthetic sets, DC's inner loop.

One loop serves all three, so the optimiser, schedule and augmentation are defined once. Data are
whole tensors on the device (DD data sets are small), batches are index slices: no DataLoader.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import augment
from .models import build_model


def new_model(arch: str, shape: tuple[int, int, int], seed: int, device: str | torch.device = "cpu",
              channels_last: bool = False) -> nn.Module:
    """A freshly initialised ``arch`` for images of ``shape`` = (channels, num_classes, im_size),
    its weights a function of ``seed`` alone (the global RNG is left untouched).

    ``channels_last`` stores conv weights NHWC, which makes every activation after them NHWC:
    on the CPU that speeds up forward-heavy work (DM's embeddings, ~1.3x) but slows training's
    backward pass, so it is chosen per use."""
    channels, num_classes, im_size = shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, channels, num_classes, im_size)
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def lr_at(epoch: int, lr: float, milestones: Sequence[int]) -> float:
    """Learning rate for 0-based ``epoch``: x0.1 for every milestone m with 0 < m <= epoch."""
    return lr * 0.1 ** sum(1 for m in milestones if 0 < m <= epoch)


def autocast(device: torch.device, precision: str = "bf16"):
    """The autocast context of a run's ``precision`` (``Config.precision``) on ``device``: the one
    place that says how training and scoring use mixed precision (:mod:`ptmdd_ray.grouped` too).

    ``bf16`` (the default): bf16 autocast on CUDA, fp32 on the CPU. ``bf16-cpu``: bf16 autocast on
    the CPU as well, where oneDNN computes bf16 natively (avx512_bf16 or AMX): the convolutions of
    evaluation and pretraining take about half the time (BENCHMARKS.md, "bf16 on the CPU"), at the
    cost of bf16 rounding in the forward pass (weights and optimiser stay fp32). ``fp32``: off.
    A CPU without native bf16 is refused (emulated bf16 would be slower than fp32)."""
    if precision in ("bf16", "bf16-cpu") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16-cpu" and device.type == "cpu":
        if not cpu_has_bf16():
            raise RuntimeError("precision bf16-cpu: this CPU computes no bf16 natively (needs avx512_bf16 "
                               "or AMX); use precision bf16 or fp32")
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_bf16() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (avx512_bf16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch: int,
    milestones: Sequence[int] = (),
    dsa_strategy: str = "none",
    gen: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
    precision: str = "bf16",
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """SGD with cross-entropy for ``epochs`` passes over (x, y), shuffled with ``gen``.

    ``dsa_strategy`` augments every batch with independent per-image DSA parameters.
    ``on_epoch(e, model)`` runs after 1-based epoch ``e`` (checkpointing hooks in here).
    ``optimizer`` lets DC's inner loop keep one optimiser across calls. ``forward(model, x)``
    replaces ``model(x)``: a compiled call (:class:`ptmdd_ray.compiled.CompiledCall`), whose
    backward pass inductor compiles too."""
    device = x.device
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = x.shape[0]
    size = x.shape[-1]
    amp = autocast(device, precision)
    for ep in range(epochs):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(ep, lr, milestones)
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            xb = x[idx]
            params = augment.sample(dsa_strategy, xb.shape[0], size, gen, device)
            xb = augment.apply(xb, params)
            with amp:
                loss = F.cross_entropy(model(xb) if forward is None else forward(model, xb), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch(ep + 1, model)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024,
             precision: str = "bf16", forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
             ) -> float:
    """Top-1 accuracy as a fraction in [0, 1]; the model is left in eval mode. ``forward(model, x)``
    replaces ``model(x)``, as in :func:`train_classifier`."""
    model.eval()
    correct = 0
    with autocast(x.device, precision):
        for start in range(0, x.shape[0], batch):
            xb = x[start:start + batch]
            logits = model(xb) if forward is None else forward(model, xb)
            correct += (logits.argmax(1) == y[start:start + batch]).sum().item()
    return correct / max(1, x.shape[0])
