"""The distillation loop every method shares: a fresh matching network per iteration, the method's
step, loss records, periodic callbacks (intermediate evaluation, checkpoints) and an exact resume
from a :class:`DistillState`."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import augment
from ..compiled import CompiledCall
from ..config import DistillConfig
from ..data import ImageData
from ..errors import DivergenceError
from ..synthetic import RealSampler, init_synthetic
from ..train import new_model
from .base import Guide, groups
from .dc import dc_step
from .dm import dm_step
from .mtt import Trajectory, draw_segment, trajectory_loss, trajectory_loss_recomputed

# SGD momentum of MTT's learnable step size (the reference's optimizer_lr)
LR_MOMENTUM = 0.5


@dataclass
class DistillState:
    """Everything a distillation needs to go on exactly where it stopped: the synthetic set, its
    optimizer's momentum, every random state and the history so far. Tensors plus JSON metadata
    (:meth:`tensors`, :meth:`meta`), so that a checkpoint of it loads without executing pickle."""
    iteration: int  # iterations done
    images: torch.Tensor
    momentum: torch.Tensor | None
    gen: torch.Tensor  # torch.Generator.get_state()
    guide: dict[str, Any]  # the guide's random states ({} without a guide)
    loss_history: list[tuple[int, float]]
    seconds: float
    syn_lr: torch.Tensor | None = None  # MTT's learnable step size and its momentum
    syn_lr_momentum: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"images": self.images, "gen": self.gen}
        for name in ("momentum", "syn_lr", "syn_lr_momentum"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update({f"guide.{k}": v for k, v in self.guide.items() if isinstance(v, torch.Tensor)})
        return out

    def meta(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "loss_history": self.loss_history, "seconds": self.seconds,
                "guide": {k: v for k, v in self.guide.items() if not isinstance(v, torch.Tensor)}}

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> DistillState:
        guide = {**meta["guide"], **{k[len("guide."):]: v for k, v in tensors.items() if k.startswith("guide.")}}
        return cls(int(meta["iteration"]), tensors["images"], tensors.get("momentum"), tensors["gen"], guide,
                   [(int(i), float(v)) for i, v in meta["loss_history"]], float(meta["seconds"]),
                   tensors.get("syn_lr"), tensors.get("syn_lr_momentum"))


@dataclass
class Distilled:
    images: torch.Tensor  # (classes * ipc, C, H, W), normalised, on CPU
    labels: torch.Tensor  # (classes * ipc,)
    seconds: float
    iterations: int
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    lr: float | None = None  # MTT: the learned step size, at which the set is evaluated


def pass_precision(cfg: DistillConfig, precision: str) -> str:
    """The precision of a distillation's compiled passes under the run's ``precision``: DM's
    embeddings and its guide's PTM passes, DC/DSA's inner-loop training. ``bf16-cpu`` autocasts
    them to bf16 when they are compiled (``distill.compile``), where they pay (BENCHMARKS.md, "bf16
    on the CPU"); eager bf16 is no faster than fp32 on the CPU (each eager call converts layouts;
    with channels-last weights it is slower), so eager passes stay fp32. DC/DSA's gradient matching stays fp32 whatever the
    precision: it differentiates through gradients, where bf16 would round the matched quantity
    itself. ``bf16`` leaves distillation in fp32 on CUDA too: its published GPU figures are fp32."""
    return "bf16-cpu" if precision == "bf16-cpu" and cfg.compile else "fp32"


def distill(
    cfg: DistillConfig,
    model: str,
    data: ImageData,
    seed: int,
    guide: Guide | None = None,
    progress: bool = True,
    on_log: Callable[[int, float], None] | None = None,
    every: int = 0,
    on_every: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    resume: DistillState | None = None,
    state_every: int = 0,
    on_state: Callable[[DistillState], None] | None = None,
    precision: str = "fp32",
    experts: list[Trajectory] | None = None,
) -> Distilled:
    """Run ``cfg.method`` for ``cfg.iterations`` iterations on ``data`` (already on its device).
    With ``every`` > 0, ``on_every(iterations done, images, labels)`` (MTT: also ``lr=`` the step
    size learned so far, which its set trains at) sees a detached copy of the
    synthetic set every ``every`` iterations before the last (intermediate evaluation, pruning).
    With ``state_every`` > 0, ``on_state`` gets a :class:`DistillState` every ``state_every``
    iterations before the last (a checkpoint); ``resume`` continues from one, with the same result
    as the uninterrupted run (every random draw comes from the saved generators). ``precision`` is
    the run's (``Config.precision``); see :func:`pass_precision` for what it does here. MTT
    matches segments of ``experts`` and learns its step size with the images (``Distilled.lr``)."""
    device = data.x_train.device
    gen = torch.Generator().manual_seed(seed)
    classes = data.num_classes
    syn, labels = _initial_set(data, cfg, gen, resume)
    syn_y = labels.to(device)
    opt = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum_img)
    syn_lr = _learned_lr(cfg, opt, resume, device)
    sampler = RealSampler(data, gen)
    shape = (data.channels, classes, data.im_size)
    history: list[tuple[int, float]] = list(resume.loss_history) if resume else []
    start, before = (_restore(resume, opt, gen, guide), resume.seconds) if resume else (0, 0.0)

    step = _outer_step(cfg, syn, syn_y, sampler, gen, guide, opt, classes, precision, experts, syn_lr)
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.iterations), desc=f"distill {cfg.method}", disable=not progress, leave=False,
               initial=start, total=cfg.iterations)
    for it in bar:
        net = new_model(model, shape, seed=int(torch.randint(2**31 - 1, (1,), generator=gen)), device=device,
                        channels_last=cfg.method == "dm")
        step_losses = step(net)
        if it % cfg.log_every == 0 or it == cfg.iterations - 1:
            _record_loss(it, step_losses, syn, history, bar, on_log)
        if on_every is not None and _due(it + 1, every, cfg.iterations):
            on_every(it + 1, syn.detach().clone(), labels,
                     **({} if syn_lr is None else {"lr": float(syn_lr.detach())}))
        if on_state is not None and _due(it + 1, state_every, cfg.iterations):
            on_state(_snapshot(it + 1, syn, syn_lr, opt, gen, guide, history, before + time.perf_counter() - t0))
    if not torch.isfinite(syn).all():
        raise DivergenceError("distillation diverged: non-finite synthetic pixels; lower distill.lr_img")
    return Distilled(syn.detach().cpu(), labels, before + time.perf_counter() - t0, cfg.iterations, history,
                     None if syn_lr is None else float(syn_lr.detach()))


def _learned_lr(cfg: DistillConfig, opt: torch.optim.Optimizer, resume: DistillState | None, device
                ) -> torch.Tensor | None:
    """MTT's learnable step size (``lr_teacher`` at first, or the resumed value), optimised by
    ``opt`` at ``lr_lr`` as a second parameter group; None for the other methods."""
    if cfg.method != "mtt":
        return None
    value = resume.syn_lr if resume is not None and resume.syn_lr is not None else torch.tensor(cfg.lr_teacher)
    syn_lr = value.detach().clone().float().to(device).requires_grad_(True)
    opt.add_param_group({"params": [syn_lr], "lr": cfg.lr_lr, "momentum": LR_MOMENTUM})
    return syn_lr


def _outer_step(cfg: DistillConfig, syn: torch.Tensor, syn_y: torch.Tensor, sampler: RealSampler,
                gen: torch.Generator, guide: Guide | None, opt: torch.optim.Optimizer, classes: int,
                precision: str = "fp32", experts: list[Trajectory] | None = None,
                syn_lr: torch.Tensor | None = None) -> Callable[[nn.Module], list[torch.Tensor]]:
    """One iteration of ``cfg.method`` on a fresh network, as a call returning its losses. With
    ``distill.compile`` the passes that dominate go through a compiled call built from the first
    network (later networks are its inputs, so one graph serves them all): DM's embedding (and the
    PTMs' forward, through the guide), DC/DSA's inner-loop training forward."""
    compiled: CompiledCall | None = None
    passes = pass_precision(cfg, precision)

    def update(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def dm(net: nn.Module) -> list[torch.Tensor]:
        nonlocal compiled
        if cfg.compile and compiled is None:
            compiled = CompiledCall(net, "embed")
        loss = dm_step(net, syn, syn_y, sampler, cfg, cfg.ipc, classes, gen, guide, compiled, passes)
        update(loss)
        return [loss.detach()]

    def dc(net: nn.Module) -> list[torch.Tensor]:
        nonlocal compiled
        if cfg.compile and compiled is None:
            compiled = CompiledCall(net, "forward")
        return dc_step(net, syn, syn_y, sampler, cfg, cfg.ipc, classes, gen, guide, update, compiled, passes)

    def mtt(net: nn.Module) -> list[torch.Tensor]:
        expert, start = draw_segment(experts, cfg.max_start_epoch, cfg.expert_epochs, gen)
        matching = trajectory_loss_recomputed if cfg.mtt_gradient == "recomputed" else trajectory_loss
        loss = matching(net, expert.params[start], expert.params[start + cfg.expert_epochs], syn, syn_y,
                        syn_lr, cfg.syn_steps, cfg.batch_syn or syn.shape[0], cfg.dsa_strategy, gen)
        if guide is not None:  # the raw set, as the reference's CLoM; loss.augmented: one DSA draw of it
            loss = loss + guide(_guide_view(syn, cfg, classes, gen, guide), syn, syn_y)
        update(loss)
        if not float(syn_lr.detach()) > 0:  # no student (and no evaluation) can train at it
            raise DivergenceError(f"MTT's learned step size went to {float(syn_lr.detach()):.3g}; "
                                  "lower distill.lr_lr")
        return [loss.detach()]

    if cfg.method == "mtt":
        if not experts:
            raise ValueError("MTT needs expert trajectories (ptmdd_ray.experts.resolve_experts)")
        return mtt
    if cfg.method != "dm":
        return dc
    if cfg.compile and hasattr(guide, "compile"):
        guide.compile(passes)
    return dm


def _guide_view(syn: torch.Tensor, cfg: DistillConfig, classes: int, gen: torch.Generator, guide: Guide
                ) -> torch.Tensor:
    """What an MTT iteration's guide scores as the augmented set: MTT's students augment each of
    their batches inside the unrolled steps, so a guide that asks for augmented images
    (``loss.augmented``) gets one DSA draw of the whole set, class-wise as DM's, and else the raw set."""
    if not getattr(guide, "augmented", False):
        return syn
    params = augment.sample(cfg.dsa_strategy, classes, syn.shape[-1], gen, syn.device)
    return augment.apply(syn, params, groups(classes, cfg.ipc, syn.device))


def _initial_set(data: ImageData, cfg: DistillConfig, gen: torch.Generator, resume: DistillState | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic set to optimise (on the data's device, with grad) and its labels: freshly
    initialised, or the resumed state's images (the initialisation still draws from ``gen``)."""
    images, labels = init_synthetic(data, cfg.ipc, cfg.init, gen)
    if resume is not None:  # in the fresh run's memory layout (a saved tensor comes back contiguous,
        images = torch.empty_like(images).copy_(resume.images)  # and the layout picks the kernels)
    return images.to(data.x_train.device).requires_grad_(True), labels


def _record_loss(it: int, step_losses: list[torch.Tensor], syn: torch.Tensor, history: list[tuple[int, float]],
                 bar, on_log: Callable[[int, float], None] | None) -> None:
    """Log iteration ``it``'s mean loss; stop on a divergence (a non-finite loss or pixel)."""
    value = float(torch.stack(step_losses).mean())
    if not math.isfinite(value) or not torch.isfinite(syn).all():
        raise DivergenceError(f"distillation diverged at iteration {it} (loss {value}); lower distill.lr_img")
    history.append((it, value))
    bar.set_postfix(loss=f"{value:.4g}")
    if on_log is not None:
        on_log(it, value)


def _due(done: int, every: int, total: int) -> bool:
    """Whether a periodic callback fires after ``done`` iterations: every ``every``, not after the last."""
    return every > 0 and done % every == 0 and done < total


def _snapshot(done: int, syn: torch.Tensor, syn_lr: torch.Tensor | None, opt: torch.optim.Optimizer,
              gen: torch.Generator, guide, history: list[tuple[int, float]], seconds: float) -> DistillState:
    def momentum(t: torch.Tensor | None) -> torch.Tensor | None:
        buf = None if t is None else opt.state.get(t, {}).get("momentum_buffer")
        return None if buf is None else buf.detach().cpu().clone()

    return DistillState(done, syn.detach().cpu().clone(), momentum(syn), gen.get_state(),
                        guide.get_state() if hasattr(guide, "get_state") else {}, list(history), seconds,
                        None if syn_lr is None else syn_lr.detach().cpu().clone(), momentum(syn_lr))


def _restore(state: DistillState, opt: torch.optim.Optimizer, gen: torch.Generator, guide) -> int:
    """Put ``state``'s momentum and random states in place; returns the iteration to go on from."""
    syn = opt.param_groups[0]["params"][0]
    if state.momentum is not None:
        opt.state[syn]["momentum_buffer"] = torch.empty_like(syn, requires_grad=False).copy_(state.momentum)
    if state.syn_lr_momentum is not None:  # MTT's step size (its value came back in _learned_lr)
        syn_lr = opt.param_groups[1]["params"][0]
        opt.state[syn_lr]["momentum_buffer"] = state.syn_lr_momentum.clone().to(syn_lr.device)
    gen.set_state(state.gen)
    if hasattr(guide, "set_state"):
        guide.set_state(state.guide)
    return state.iteration
