"""MTT's expert trajectories from the PTM store: each pool PTM's run, checkpointed at every epoch
from 0 (its initialisation) to the last a segment reaches, is one expert.

A trajectory's checkpoints are the pool's own store keys (``<arch>-s<seed>-<run id>-e<epoch>``),
so they are content-addressed by the recipe that trained them (another recipe is another run id),
trained once however many trials ask (the store's lock on the run, locally or on S3, through the
Ray store actor in a study), and every missing epoch is trained, never interpolated. A trial that
reaches further than the stored epochs trains the run again from its seed to its new last epoch,
saving only the missing ones: the same draws, so the extended trajectory is the one a single
training gives (to the bit on one machine, ``tests/test_methods_mtt.py``), at the price of the
stored epochs' compute again; a study whose points reach differently pays it once per extension.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config, mtt_reach
from .data import ImageData
from .methods.mtt import Trajectory
from .pool import (Pool, PTMRepository, check_compatible, fetch_runs, load_ptm, pool_since, pool_specs, repo_counts,
                   save_epochs, source_loader)
from .store import CheckpointRepository, CheckpointStore
from .train import new_model


def trajectory_epochs(cfg: Config) -> list[int]:
    """Every epoch an MTT segment may start or end at: 0 .. max_start_epoch - 1 + expert_epochs."""
    return list(range(mtt_reach(cfg.distill) + 1))


@dataclass
class Experts:
    """The expert trajectories, and resolving them as a :class:`~ptmdd_ray.pool.Pool` of their
    last epochs: the trainings this run ran, the hits, and each trajectory's price (its PTM run up to
    that epoch), so that an expert's training is the pool's cost, as a guiding PTM's is, and not the
    distillation's."""

    trajectories: list[Trajectory]
    pool: Pool


def resolve_experts(cfg: Config, target: ImageData, device: torch.device, progress: bool = True,
                    repo: CheckpointRepository | None = None) -> Experts:
    """One :class:`Trajectory` per pool PTM of the student's architecture (``model`` x ``pool.seeds``;
    the pool's other architectures only guide), loaded through
    ``repo`` (default: a local repository on ``cfg.store``), its missing epochs trained in one run
    that also saves the pool's own epochs."""
    repo = repo or PTMRepository(CheckpointStore(cfg.store), progress)
    before = repo_counts(repo)
    load_source = source_loader(cfg, target, device)
    epochs, to_save = trajectory_epochs(cfg), save_epochs(cfg)
    specs = [spec for spec in pool_specs(cfg) if spec.arch == cfg.model]
    firsts = fetch_runs(repo, specs, epochs[0], to_save, load_source)  # trains the missing runs
    trajectories, last = [], []
    for spec, first in zip(specs, firsts):
        names = [n for n, _ in new_model(spec.arch, (target.channels, target.num_classes, target.im_size),
                                         seed=0).named_parameters()]
        params = []
        for e in epochs:
            ckpt = first if e == epochs[0] else repo.get(spec, e, to_save, load_source)
            check_compatible(tuple(ckpt.meta["shape"]), ckpt.meta["classes"], target, needs_labels=True)
            params.append(torch.cat([ckpt.tensors[n].reshape(-1) for n in names]).to(device))
        trajectories.append(Trajectory(spec.arch, params, spec.key(epochs[-1])))
        last.append(load_ptm(ckpt, "cpu"))
    return Experts(trajectories, pool_since(last, repo, before))
