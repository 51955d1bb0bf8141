"""MTT (matching training trajectories, Cazenavette et al., CVPR 2022): a few SGD steps on the
synthetic set should move a network from an expert's checkpoint at epoch t to where the expert,
trained on the real data, was at epoch t + M.

The student is the expert's parameters as one flat vector; ``syn_steps`` SGD steps on shuffled
batches of the synthetic set (DSA on each batch) are unrolled with ``create_graph``, so the loss
differentiates through all of them to the pixels and to the learnable step size ``syn_lr``. The
loss is the reference's normalised parameter distance
``||theta_N - theta_target||^2 / ||theta_start - theta_target||^2``. Memory grows linearly with
``syn_steps``: every step's activations and gradients stay alive for the backward pass, unless the
gradient is recomputed a step at a time (:func:`trajectory_loss_recomputed`, TESLA's constant memory).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import augment


@dataclass(frozen=True)
class Trajectory:
    """An expert's training run as MTT reads it: its flat parameters after each epoch, epoch 0
    being its initialisation (``params[e]`` is epoch ``e``), in ``named_parameters`` order of
    ``arch``. ``key``: the store key of the run's last checkpoint, naming where it came from."""

    arch: str
    params: list[torch.Tensor]
    key: str = ""

    @property
    def epochs(self) -> int:
        return len(self.params) - 1


def flatten(net: nn.Module) -> torch.Tensor:
    """``net``'s parameters as one flat vector (``named_parameters`` order): how a trajectory stores them."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def unflatten(net: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of ``flat`` shaped as ``net``'s parameters, for ``torch.func.functional_call``."""
    total = sum(p.numel() for p in net.parameters())
    if total != flat.numel():
        raise ValueError(f"a flat vector of {flat.numel()} parameters for a network of {total}")
    out, start = {}, 0
    for name, p in net.named_parameters():
        out[name] = flat[start:start + p.numel()].view_as(p)
        start += p.numel()
    return out


def batches(n: int, batch: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """The synthetic-set indices of each unrolled step, as the reference draws them: a fresh
    permutation split into ``batch``-sized chunks whenever the chunks run out, taken from the end.
    Lazily, so that each permutation is drawn from ``gen`` between the steps' augmentations, in
    the reference's order."""
    chunks: list[torch.Tensor] = []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(n, generator=gen), batch))
        yield chunks.pop()


def trajectory_loss(student: nn.Module, start: torch.Tensor, target: torch.Tensor, images: torch.Tensor,
                    labels: torch.Tensor, syn_lr: torch.Tensor, syn_steps: int, batch_syn: int,
                    dsa_strategy: str, gen: torch.Generator) -> torch.Tensor:
    """MTT's matching loss for one expert segment (``start`` -> ``target``, flat parameters):
    ``syn_steps`` differentiable SGD steps with step size ``syn_lr`` on batches of ``batch_syn``
    synthetic images from ``start``, then the distance to ``target`` relative to the expert's
    own. ``student`` only lends its architecture (its own weights are not used)."""
    size = images.shape[-1]
    params = start.detach().clone().requires_grad_(True)
    for idx in batches(images.shape[0], batch_syn, syn_steps, gen):
        idx = idx.to(images.device)
        x = augment.apply(images[idx], augment.sample(dsa_strategy, idx.numel(), size, gen, images.device))
        logits = torch.func.functional_call(student, unflatten(student, params), (x,))
        grad = torch.autograd.grad(F.cross_entropy(logits, labels[idx]), params, create_graph=True)[0]
        params = params - syn_lr * grad
    return (params - target).pow(2).sum() / (start - target).pow(2).sum()


def trajectory_loss_recomputed(student: nn.Module, start: torch.Tensor, target: torch.Tensor, images: torch.Tensor,
                               labels: torch.Tensor, syn_lr: torch.Tensor, syn_steps: int, batch_syn: int,
                               dsa_strategy: str, gen: torch.Generator) -> torch.Tensor:
    """:func:`trajectory_loss` with memory constant in ``syn_steps`` (``distill.mtt_gradient:
    recomputed``), the problem TESLA (Cui et al., ICML 2023) set out to solve: no unrolled graph is
    kept. The steps run forward without one, keeping only each step's parameter vector, batch and
    augmentation; the gradient then runs backward through them one step at a time (the adjoint of
    ``theta' = theta - lr * g(theta, x)``: ``lambda <- lambda - lr * H lambda``, the images get
    ``-lr * (dg/dx)^T lambda``, the step size ``-g . lambda``), recomputing that step's graph alone.
    The same gradient as the unrolled one up to float order, for 1.23-1.27x its compute (BENCHMARKS.md).

    Returns a tensor whose value is the loss and whose backward gives ``images`` and ``syn_lr``
    those gradients (a surrogate: ``value + <grad, x> - <grad, x>.detach()``), so that it adds to
    a guide's loss and goes through the optimiser as the unrolled loss does."""
    size, lr = images.shape[-1], syn_lr.detach()
    thetas, steps = [start.detach()], []
    for idx in batches(images.shape[0], batch_syn, syn_steps, gen):  # forward: no graph kept
        idx = idx.to(images.device)
        aug = augment.sample(dsa_strategy, idx.numel(), size, gen, images.device)
        theta = thetas[-1].clone().requires_grad_(True)
        g = _step_grad(student, theta, augment.apply(images[idx].detach(), aug), labels[idx], create_graph=False)
        thetas.append((thetas[-1] - lr * g).detach())
        steps.append((idx, aug))
    scale = (start - target).pow(2).sum()
    loss = (thetas[-1] - target).pow(2).sum() / scale
    adjoint = 2 * (thetas[-1] - target) / scale  # d loss / d theta_N
    grad_images, grad_lr = torch.zeros_like(images), torch.zeros_like(lr)
    for (idx, aug), theta in zip(reversed(steps), reversed(thetas[:-1])):  # backward, a step at a time
        theta = theta.clone().requires_grad_(True)
        x = images.detach()[idx].requires_grad_(True)
        g = _step_grad(student, theta, augment.apply(x, aug), labels[idx], create_graph=True)
        d_theta, d_x = torch.autograd.grad((g * adjoint).sum(), (theta, x))
        grad_lr -= (g.detach() * adjoint).sum()
        grad_images.index_add_(0, idx, -lr * d_x)
        adjoint = adjoint - lr * d_theta
    return loss.detach() + _surrogate(images, grad_images) + _surrogate(syn_lr, grad_lr)


def _step_grad(student: nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               create_graph: bool) -> torch.Tensor:
    """The student's cross-entropy gradient at flat parameters ``theta`` on the batch ``x``."""
    logits = torch.func.functional_call(student, unflatten(student, theta), (x,))
    return torch.autograd.grad(F.cross_entropy(logits, y), theta, create_graph=create_graph)[0]


def _surrogate(leaf: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Zero in value, ``grad`` as ``leaf``'s gradient in the backward pass."""
    inner = (leaf * grad).sum()
    return inner - inner.detach()


# Elements an unrolled step keeps for the backward pass per element its leaf modules output: the
# activations and what the double backward needs of their gradients. Measured 1.34 (ConvNetW32, 100
# CIFAR-sized images per step, with or without DSA: the bytes of the tensors autograd saves, per
# step, tests/test_methods_mtt.py); 2 bounds it.
KEPT_PER_ACTIVATION = 2


def activation_elements(student: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Elements the leaf modules of ``student`` output for one image (one no-grad forward)."""
    counts: list[int] = []
    leaves = [m for m in student.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, o: counts.append(o.numel())) for m in leaves]
    try:
        with torch.no_grad():
            student(torch.zeros(1, *image_shape, device=next(student.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return sum(counts)


def student_bytes(student: nn.Module, image_shape: tuple[int, int, int], batch: int, syn_steps: int,
                  gradient: str = "unrolled") -> int:
    """What the student keeps for the backward pass. Unrolled: linear in ``syn_steps``, per step the
    activations of ``batch`` images (and their gradients), and a new parameter vector with its
    gradient. Recomputed: one such step, and a parameter vector per step."""
    params = sum(p.numel() for p in student.parameters())
    per_step = batch * activation_elements(student, image_shape) * KEPT_PER_ACTIVATION + 2 * params
    return 4 * (syn_steps * per_step if gradient == "unrolled" else per_step + syn_steps * params)


def draw_segment(experts: list[Trajectory], max_start_epoch: int, expert_epochs: int, gen: torch.Generator
                 ) -> tuple[Trajectory, int]:
    """One iteration's expert and start epoch: an expert uniformly (the reference's ``--load_all``;
    by default it walks a shuffled buffer file of experts in turn, the same distribution over a
    run), a start epoch uniformly in ``[0, max_start_epoch)`` (its ``np.random.randint(0, max_start_epoch)``)."""
    expert = experts[int(torch.randint(len(experts), (1,), generator=gen))]
    start = int(torch.randint(max_start_epoch, (1,), generator=gen))
    if start + expert_epochs > expert.epochs:
        raise ValueError(f"expert {expert.key or expert.arch} keeps {expert.epochs} epochs; start epoch {start} + "
                         f"expert_epochs {expert_epochs} is beyond it")
    return expert, start
