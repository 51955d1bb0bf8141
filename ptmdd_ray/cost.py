"""What a run costs: wall-clock, CPU and GPU seconds of its phases, and its share of the PTM pool.

Reviewers of the paper asked what the PTMs cost ("pretraining models with different initialization
and architecture seems time-consuming"). A trial answers with ``cost.*`` (result.json's ``cost``
and the MLflow metrics of the same names), all from this module:

- ``cost.<phase>.wall_s``: wall-clock seconds; ``cost.<phase>.cpu_s``: CPU seconds of the process
  (every thread: 2 busy threads for 1 s count 2 s); ``cost.<phase>.gpu_s``: on CUDA, the wall
  seconds of the phase with the device synchronised at both ends (the time it held the GPU), else
  absent. Phases: ``guide`` (the PTMs' real-feature caches), ``distill`` (the distillation
  alone; a run that went on from a checkpoint adds the earlier attempts' seconds up to it, which
  the checkpoint carries), ``eval`` (the synthetic set), ``baseline`` (the random-real subset; 0 when read back
  from the store).
- ``cost.ptm_train.*``: the PTM trainings this trial ran itself (0 when the store had them), MTT's
  expert trajectories included.
- ``cost.pool.*``: what its pool's PTMs cost to train, each up to its epoch (for MTT's experts, the
  last epoch a segment reaches), whoever trained them (the pool's price if it served this point
  alone); ``cost.pool_amortised.*``: each PTM's cost divided by the number of the study's trials
  whose pool holds it (:func:`amortised`).
- ``cost.seconds``: the point's wall seconds all told, the pool amortised: guide + distill + eval
  + baseline + pool_amortised (what a second search objective minimises).
- ``cost.peak_rss_mb`` (and ``cost.peak_gpu_mb`` on CUDA), ``cost.store_bytes`` (checkpoints it
  wrote to the store).

No torch here: a meter on CUDA is handed the device's ``synchronize``.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

PHASES = ("guide", "distill", "eval", "baseline", "ptm_train", "pool", "pool_amortised")
SCALARS = ("seconds", "baseline_wait_s", "peak_rss_mb", "store_bytes")


def metric_names(gpu: bool = False) -> list[str]:
    """Every ``cost.*`` metric a trial reports (the GPU ones only on CUDA): what a search may
    minimise as its second objective."""
    clocks = ("wall_s", "cpu_s", "gpu_s") if gpu else ("wall_s", "cpu_s")
    gpu_only = ("peak_gpu_mb",) if gpu else ()
    return [f"cost.{p}.{c}" for p in PHASES for c in clocks] + [f"cost.{s}" for s in (*SCALARS, *gpu_only)]


@dataclass(frozen=True)
class Seconds:
    """The seconds one phase took: wall-clock, CPU (all the process's threads), GPU (None off CUDA)."""

    wall: float = 0.0
    cpu: float = 0.0
    gpu: float | None = None

    def __add__(self, other: Seconds) -> Seconds:
        gpu = None if self.gpu is None and other.gpu is None else (self.gpu or 0.0) + (other.gpu or 0.0)
        return Seconds(self.wall + other.wall, self.cpu + other.cpu, gpu)

    def __sub__(self, other: Seconds) -> Seconds:
        return self + other.scaled(-1.0)

    def scaled(self, factor: float) -> Seconds:
        return Seconds(self.wall * factor, self.cpu * factor, None if self.gpu is None else self.gpu * factor)

    def as_dict(self) -> dict[str, float]:
        out = {"wall_s": self.wall, "cpu_s": self.cpu}
        return out if self.gpu is None else {**out, "gpu_s": self.gpu}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Seconds | None:
        """The inverse of :meth:`as_dict`; None for a record without one (stored before costs were)."""
        if not d or "wall_s" not in d:
            return None
        return cls(float(d["wall_s"]), float(d.get("cpu_s", 0.0)), None if d.get("gpu_s") is None else float(d["gpu_s"]))


class Meter:
    """``with Meter(sync) as m: ...`` then ``m.seconds``. ``sync`` (e.g. ``torch.cuda.synchronize``)
    runs at both ends so that queued GPU work is counted in the phase that queued it; with it the
    phase's wall seconds are its GPU seconds too."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync
        self.seconds = Seconds()

    def __enter__(self) -> Meter:
        if self.sync is not None:
            self.sync()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = self._elapsed(sync=exc[0] is None)  # a failed phase's queue is not waited for

    def lap(self) -> Seconds:
        """The seconds since entering, without leaving (a training's cost up to a checkpoint)."""
        return self._elapsed(sync=True)

    def _elapsed(self, sync: bool) -> Seconds:
        if sync and self.sync is not None:
            self.sync()
        wall = time.perf_counter() - self._wall
        return Seconds(wall, time.process_time() - self._cpu, wall if self.sync is not None else None)


def device_sync(device) -> Callable[[], None] | None:
    """What a :class:`Meter` of work on ``device`` (a ``torch.device``) synchronises: CUDA's
    ``synchronize``, or nothing on the CPU (torch is imported only then)."""
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.synchronize


def measured(sync: Callable[[], None] | None, step: Callable[..., T], *args, **kwargs) -> tuple[T, Seconds]:
    """``step(*args, **kwargs)`` and what it cost."""
    with Meter(sync) as m:
        out = step(*args, **kwargs)
    return out, m.seconds


def amortised(costs: Mapping[str, Seconds | None], users: Mapping[str, int]) -> Seconds | None:
    """A point's share of its pool: each PTM's (key's) training cost over the number of trials that
    use it (``users``; at least 1). None when a PTM's cost is unknown (a checkpoint stored before
    costs were recorded)."""
    total = Seconds()
    for key, c in costs.items():
        if c is None:
            return None
        total = total + c.scaled(1.0 / max(1, users.get(key, 1)))
    return total


def pool_total(costs: Mapping[str, Seconds | None]) -> Seconds | None:
    """The pool's price if it served one point alone; None when a PTM's cost is unknown."""
    return amortised(costs, {})


def flat(record: Mapping[str, Any]) -> dict[str, float]:
    """``cost.*`` metrics of a result's ``cost`` record (phases as ``cost.<phase>.<wall_s|cpu_s|gpu_s>``,
    scalars as ``cost.<name>``); an unknown (None) entry is left out rather than logged as 0."""
    out: dict[str, float] = {}
    for name, v in record.items():
        if isinstance(v, Mapping):
            out.update({f"cost.{name}.{k}": float(x) for k, x in v.items() if x is not None})
        elif v is not None:
            out[f"cost.{name}"] = float(v)
    return out
