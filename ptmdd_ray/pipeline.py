"""End-to-end jobs on one :class:`~ptmdd_ray.config.Config`: pretrain the pool if needed, distill,
evaluate against the random-real baseline, write the artifacts. The CLI and Ray Tune trials call
these; they do no argument parsing and no printing.

:func:`run_distill` is its steps in order, each one call: the target data, the pool
(:func:`ptmdd_ray.pool.resolve_pool`), the distillation (:func:`distill_set`, with its evaluations
along the way and its checkpoints), the evaluation (:func:`ptmdd_ray.baseline.evaluate_against_baseline`),
the result and its files. Every check that needs the data (IPC vs class sizes, PTM compatibility)
runs before anything is written, and the output directory is only populated at the very end, file
by atomic file.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from . import __version__, artifacts, cost
from .baseline import Scores, evaluate_against_baseline, random_real_baseline
from .config import Config, ConfigError, eval_split, mtt_for_ipc, mtt_reach, mtt_table_for, source_dataset, to_dict
from .data import ImageData, load_data
from .errors import MemoryShortError
from .evaluate import evaluate_set
from .experts import resolve_experts
from .methods import Distilled, DistillState, distill
from .methods.mtt import Trajectory, student_bytes
from .pool import PTM_DATA_SEED, Pool, PTMGuide, resolve_pool
from .proc import meminfo_mb, memory_mb, release_freed_memory
from .sources import parse_name
from .store import CheckpointRepository
from .train import new_model

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but CUDA is not available")
    return torch.device(name)


def check_ipc(data: ImageData, ipc: int, key: str = "distill.ipc") -> None:
    counts = [int(i.numel()) for i in data.class_indices()]
    smallest = min(counts)
    if ipc > smallest:
        c = counts.index(smallest)
        if data.has_val:  # the hold-out is what took them
            held = int((data.y_val == c).sum())
            raise ConfigError(f"dataset.val_per_class: {held} held out of class {data.classes[c]!r}'s "
                              f"{smallest + held} training images leaves {smallest}, fewer than {key} {ipc}")
        raise ConfigError(f"{key}: {ipc} images per class requested but class {data.classes[c]!r} "
                          f"has only {smallest} training images")


def check_mtt_memory(cfg: Config, data: ImageData, device: torch.device) -> None:
    """MTT keeps every unrolled student step until its backward pass (memory linear in
    ``syn_steps``, :func:`~ptmdd_ray.methods.mtt.student_bytes`; one step with
    ``mtt_gradient: recomputed``) and every expert's trajectory on the device (a parameter vector per
    epoch 0 .. max_start_epoch - 1 + expert_epochs): a run that cannot fit is refused in one line
    before the pool is fetched or anything is distilled."""
    d = cfg.distill
    if d.method != "mtt":
        return
    size = d.ipc * data.num_classes
    batch = min(d.batch_syn or size, size)
    student = new_model(cfg.model, (data.channels, data.num_classes, data.im_size), seed=0, device=device)
    steps = student_bytes(student, (data.channels, data.im_size, data.im_size), batch, d.syn_steps, d.mtt_gradient)
    need = (steps + trajectory_bytes(student, cfg)) / 2**20
    check_fits(need, *device_memory_mb(device), device.type,
               what=f"distill.syn_steps: MTT's {d.syn_steps} {d.mtt_gradient} steps of {batch} images and "
                    f"its experts' trajectories need ~{need / 1024:.1f} GiB",
               hint="lower distill.syn_steps or distill.batch_syn"
                    + (", or set distill.mtt_gradient: recomputed" if d.mtt_gradient == "unrolled" else "")
                    + ", or fewer pool.seeds or a lower distill.max_start_epoch")


def trajectory_bytes(student: torch.nn.Module, cfg: Config) -> int:
    """The experts on the device: one float32 parameter vector per expert (a pool seed of the
    student's architecture) and kept epoch."""
    experts = len(cfg.pool.seeds)
    return 4 * experts * (mtt_reach(cfg.distill) + 1) * sum(p.numel() for p in student.parameters())


def note_unwhitened_mtt(cfg: Config) -> None:
    """MTT's published learning rates for IPC 1 and 10 were tuned on ZCA-whitened images: a run that
    keeps them on raw images is off the paper's setting, and its log says so."""
    d, ds = cfg.distill, cfg.dataset
    if d.method != "mtt" or ds.zca:
        return
    row = mtt_for_ipc(d.ipc, mtt_table_for(parse_name(ds.name, "dataset")[0]))
    if row["zca"] and (d.lr_img, d.lr_lr) == (row["lr_img"], row["lr_lr"]):
        log.warning("MTT's published lr_img %g and lr_lr %g for IPC %d were tuned on ZCA-whitened images; "
                    "dataset.zca is off, so this run is off the paper's setting", d.lr_img, d.lr_lr, d.ipc)


def device_memory_mb(device: torch.device) -> tuple[float | None, float | None]:
    """(free, total) MiB of the device: CUDA's own count, else the machine's (/proc/meminfo)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free / 2**20, total / 2**20
    return meminfo_mb("MemAvailable"), meminfo_mb("MemTotal")


def check_fits(need_mb: float, free_mb: float | None, total_mb: float | None, device_type: str, what: str,
               hint: str) -> None:
    """Refuse a run that needs more memory than the device has at all (bad input, :class:`ConfigError`)
    or than is free on it now (:class:`MemoryShortError`: other processes hold the rest and may give it
    back, so a study's trial that meets it is retried, not recorded as failing for good)."""
    if total_mb is not None and need_mb > total_mb:
        raise ConfigError(f"{what}, more than the {total_mb / 1024:.1f} GiB this {device_type} has; {hint}")
    if free_mb is not None and need_mb > free_mb:
        raise MemoryShortError(f"{what}, more than the {free_mb / 1024:.1f} GiB free on {device_type} now "
                               f"(other processes hold the rest); {hint}")


class Checkpoints(Protocol):
    """Where a run keeps its distillation state along the way, every ``every`` iterations, to go
    on from it after a crash (a study trial: Tune's checkpoints). ``extra``: the pipeline's own
    history (intermediate evaluations)."""
    every: int

    def load(self) -> tuple[DistillState, dict[str, Any]] | None: ...

    def save(self, state: DistillState, extra: dict[str, Any]) -> None: ...


def run_distill(cfg: Config, out: str | Path | None = None, progress: bool = True,
                on_log: Callable[[int, float], None] | None = None, repo: CheckpointRepository | None = None,
                data: ImageData | None = None, on_eval: Callable[[int, float], None] | None = None,
                checkpoints: Checkpoints | None = None, ptm_users: Mapping[str, int] | None = None
                ) -> dict[str, Any]:
    """Pretrain-if-needed, distill, evaluate; write ``result.json``, ``synthetic.parquet`` and
    ``synthetic.png`` into ``out`` (if given). Returns the result mapping. ``repo`` serves the
    pool (default: a local :class:`~ptmdd_ray.pool.PTMRepository` on ``cfg.store``); ``data`` is
    ``cfg.dataset`` already loaded (a study shares one copy between its trials). With
    ``eval.every`` > 0 the set is also evaluated along the way (one run per arch, no baseline) and
    ``on_eval(iteration, mean accuracy)`` hears each result: a Tune scheduler prunes on these.
    With ``checkpoints`` the distillation goes on from the last saved state, if any, and saves its
    state along the way. ``ptm_users``: how many runs of the study share each PTM (by key), which
    divides its training cost in ``cost.pool_amortised`` (default: this run alone)."""
    device = pick_device(cfg.device)
    sync = cost.device_sync(device)
    if sync is not None:
        torch.cuda.reset_peak_memory_stats(device)  # cost.peak_gpu_mb is this run's
    data = target_data(cfg, data, device)
    check_mtt_memory(cfg, data, device)
    note_unwhitened_mtt(cfg)
    pool, pool_cost = cost.measured(sync, resolve_pool, cfg, data, device, progress, repo=repo)
    guide, guide_cost = cost.measured(sync, PTMGuide.from_config, cfg.loss, pool.ptms, data, cfg.seed)
    experts = None
    if cfg.distill.method == "mtt":  # the experts are pool PTMs too: their training is the pool's cost
        experts, experts_cost = cost.measured(sync, resolve_experts, cfg, data, device, progress, repo)
        pool, pool_cost = pool.joined(experts.pool), pool_cost + experts_cost
    run = distill_set(cfg, data, guide, progress, on_log, on_eval, checkpoints,
                      experts.trajectories if experts else None, sync)
    release_freed_memory()  # the distillation's graphs (MTT's unrolled steps: GiBs) back to the machine
    scores = evaluate_against_baseline(cfg, data, run.syn.images, run.syn.labels, progress, set_lr=run.syn.lr)
    costs = cost_record(pool, ptm_users or {}, {"guide": guide_cost, "distill": run.cost,
                                                 "eval": scores.set_cost, "baseline": scores.baseline_cost},
                        scores.baseline_wait_seconds, device)
    result = result_record(cfg, device, pool, run, scores, {"pool": pool_cost.wall, "guide": guide_cost.wall},
                           costs)
    if out is not None:
        write_outputs(Path(out), result, run.syn.images, run.syn.labels, data, cfg)
    return result


def target_data(cfg: Config, data: ImageData | None, device: torch.device) -> ImageData:
    """``cfg.dataset`` (loaded unless given) on ``device``, once its class sizes are checked
    against ``distill.ipc``."""
    data = data if data is not None else load_data(cfg.dataset, cfg.seed)
    check_ipc(data, cfg.distill.ipc)
    return data.to(device)


def cost_record(pool: Pool, ptm_users: Mapping[str, int], phases: dict[str, cost.Seconds], baseline_wait: float,
                device: torch.device) -> dict[str, Any]:
    """result.json's ``cost`` (see :mod:`ptmdd_ray.cost` for every entry): the phases' seconds,
    the trainings this run ran, its pool's price alone and amortised over ``ptm_users``, peak
    memory and store bytes; ``seconds``: the run all told with its pool amortised (None entries:
    a PTM stored before costs were recorded)."""
    total, share = cost.pool_total(pool.costs()), cost.amortised(pool.costs(), ptm_users)
    wall = sum(c.wall for c in phases.values()) + (share.wall if share is not None else 0.0)
    out: dict[str, Any] = {**{k: c.as_dict() for k, c in phases.items()}, "baseline_wait_s": baseline_wait,
                           "ptm_train": pool.trained.as_dict(),
                           "pool": None if total is None else total.as_dict(),
                           "pool_amortised": None if share is None else share.as_dict(),
                           "seconds": wall if share is not None else None,
                           "peak_rss_mb": memory_mb().get("mem.peak_rss_mb"), "store_bytes": pool.bytes_written}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


@dataclass
class DistillRun:
    """A distillation as the pipeline ran it: the set, its evaluations along the way (on
    ``eval_split``) and the iteration it went on from (0: from the start)."""

    syn: Distilled
    eval_history: list[tuple[int, float]]
    eval_split: str
    resumed_from: int
    cost: cost.Seconds  # the distillation's, all told: a resumed run's earlier attempts included


def distill_set(cfg: Config, data: ImageData, guide: PTMGuide, progress: bool = True,
                on_log: Callable[[int, float], None] | None = None,
                on_eval: Callable[[int, float], None] | None = None,
                checkpoints: Checkpoints | None = None, experts: list[Trajectory] | None = None,
                sync: Callable[[], None] | None = None) -> DistillRun:
    """Distill ``cfg.distill`` on ``data`` (with ``guide``, if it has PTMs; MTT along its
    ``experts``), evaluating the set along the way (:class:`IntermediateEvals`); with
    ``checkpoints``, going on from the last saved state and saving it (with the evaluations so far
    and the cost so far) along the way. ``DistillRun.cost`` is what the whole distillation cost:
    a resumed run adds the seconds its checkpoint recorded to its own, so a study's ``cost.*`` of a
    trial that was interrupted counts every attempt's work up to its last checkpoint, not only the
    last attempt's (``sync``: the device's, as for :class:`~ptmdd_ray.cost.Meter`)."""
    with cost.Meter(sync) as meter:
        resume, extra = (checkpoints.load() if checkpoints else None) or (None, {})
        earlier = cost.Seconds.from_dict(extra.get("cost")) or cost.Seconds()  # none before it was recorded
        along = IntermediateEvals(cfg, data, extra.get("eval_history", []), on_eval)

        def save_state(state: DistillState) -> None:
            checkpoints.save(state, {"eval_history": along.history, "cost": (earlier + meter.lap()).as_dict()})

        syn = distill(cfg.distill, cfg.model, data, cfg.seed, guide or None, progress, on_log,
                      cfg.eval.every, along, resume=resume, state_every=checkpoints.every if checkpoints else 0,
                      on_state=save_state if checkpoints else None, precision=cfg.precision, experts=experts)
    return DistillRun(syn, along.history, along.split, resume.iteration if resume else 0, earlier + meter.seconds)


class IntermediateEvals:
    """The evaluations along the way (``eval.every``): one run per arch of ``cfg.eval``, no
    baseline, scored on :func:`~ptmdd_ray.config.eval_split`; ``history`` holds (iteration, mean accuracy)
    (starting from a resumed run's), and ``on_eval`` hears each."""

    def __init__(self, cfg: Config, data: ImageData, history: list, on_eval: Callable[[int, float], None] | None):
        self.data, self.seed, self.on_eval = data, cfg.seed, on_eval
        self.quick = replace(cfg.eval, runs=1)
        self.precision = cfg.precision
        self.split = eval_split(cfg)
        self.history: list[tuple[int, float]] = [(int(i), float(a)) for i, a in history]

    def __call__(self, it: int, images: torch.Tensor, labels: torch.Tensor, lr: float | None = None) -> None:
        """Evaluate the set of iteration ``it``; ``lr``: its own learning rate (MTT's learned step
        size so far), as the final evaluation uses."""
        protocol = self.quick if lr is None else replace(self.quick, lr=lr)
        acc = evaluate_set(images, labels, self.data, protocol, self.seed, False, splits=(self.split,),
                           precision=self.precision)[self.split]
        mean = sum(a["mean"] for a in acc.values()) / len(acc)
        self.history.append((it, mean))
        if self.on_eval is not None:
            self.on_eval(it, mean)


def result_record(cfg: Config, device: torch.device, pool: Pool, run: DistillRun, scores: Scores,
                  seconds: dict[str, float], costs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The mapping ``result.json`` holds (``seconds``: of the steps before the distillation;
    ``costs``: :func:`cost_record`)."""
    syn = run.syn
    return {
        "version": __version__,
        "config": to_dict(cfg),
        "accuracy": scores.accuracy["test"],
        "baseline_random": scores.baseline.get("test"),
        "val_accuracy": scores.accuracy.get("val"),
        "baseline_random_val": scores.baseline.get("val"),
        "eval_split": run.eval_split,  # the split of eval_history
        "pool": pool.manifest(),
        "pool_stats": {"trainings": pool.trainings, "hits": pool.hits, "seconds": seconds["pool"]},
        "timing": {"distill_seconds": syn.seconds, "iterations": syn.iterations,
                   "seconds_per_iteration": syn.seconds / max(1, syn.iterations), "eval_seconds": scores.seconds,
                   "baseline_cached": scores.baseline_cached, "resumed_from": run.resumed_from,
                   "baseline_wait_seconds": scores.baseline_wait_seconds, "guide_seconds": seconds["guide"]},
        "loss_history": syn.loss_history,
        "learned_lr": syn.lr,  # MTT: the step size it learned, at which the set was evaluated (else None)
        "eval_history": run.eval_history,
        "cost": costs or {},
        "device": str(device),
        "synthetic": "synthetic.parquet",
        "image": "synthetic.png",
    }


def synthetic_meta(cfg: Config, data: ImageData) -> dict[str, Any]:
    return {"config": to_dict(cfg), "mean": list(data.mean), "std": list(data.std), "classes": data.classes}


def write_outputs(out: Path, result: dict, images: torch.Tensor, labels: torch.Tensor, data: ImageData,
                  cfg: Config) -> None:
    artifacts.write_synthetic(out / "synthetic.parquet", images, labels, synthetic_meta(cfg, data))
    artifacts.write_atomic(out / "synthetic.png",
                           artifacts.grid_png(data.denormalize(images.to(data.x_train.device)).cpu(), labels,
                                              data.num_classes))
    artifacts.write_json(out / "result.json", result)  # last: its presence marks a complete run


def run_pretrain(cfg: Config, progress: bool = True) -> Pool:
    """Build or extend the pool of ``cfg`` in the store (no distillation)."""
    device = pick_device(cfg.device)
    src = load_data(source_dataset(cfg), PTM_DATA_SEED).to(device)
    return resolve_pool(cfg, src, device, progress, idle=True)


def run_evaluate(cfg: Config, images: torch.Tensor, labels: torch.Tensor, progress: bool = True) -> dict[str, Any]:
    """Evaluate a saved synthetic set on ``cfg.dataset`` with ``cfg.eval``."""
    device = pick_device(cfg.device)
    data = load_data(cfg.dataset, cfg.seed)
    shape = list(images.shape[1:])
    if shape != [data.channels, data.im_size, data.im_size]:
        raise ConfigError(f"dataset: synthetic images are {shape}, the dataset gives "
                          f"{[data.channels, data.im_size, data.im_size]}")
    if int(labels.max()) >= data.num_classes:
        raise ConfigError(f"dataset: synthetic labels go up to {int(labels.max())}, the dataset has "
                          f"{data.num_classes} classes")
    data = data.to(device)
    ipc = int(torch.bincount(labels).max())
    acc = evaluate_set(images, labels, data, cfg.eval, cfg.seed, progress, "eval synthetic",
                       precision=cfg.precision)
    out = {"config": to_dict(cfg), "accuracy": acc["test"], "baseline_random": None, "val_accuracy": acc.get("val"),
           "baseline_random_val": None, "ipc": ipc}
    if cfg.eval.baseline:
        check_ipc(data, ipc, "synthetic")
        base, _ = random_real_baseline(cfg, data, ipc, progress, reuse=False)
        out["baseline_random"], out["baseline_random_val"] = base["test"], base.get("val")
    return out
