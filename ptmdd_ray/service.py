"""The PTM checkpoint store as a Ray service, shared by every trial of every study on a cluster.

One named, detached actor per store location (namespace ``ptmdd``) serves checkpoints. A missing
PTM is trained exactly once however many trials ask for it at the same moment (single flight:
later callers await the training already under way), as a Ray task with its own resources (a GPU
when the cluster has one). Weights go back through the object store as numpy buffers, which Ray
reads zero-copy. Everything durable lives in the :class:`~ptmdd_ray.store.CheckpointStore`, so an
actor restarted by Ray (``max_restarts=-1``) or started by a later study recovers its index from
storage and retrains nothing.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import warnings

import numpy as np
import ray
import torch

from .pool import load_checked
from .store import Checkpoint, CheckpointStore

log = logging.getLogger(__name__)

NAMESPACE = "ptmdd"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local_ray(**kwargs) -> None:
    """Start a single-machine Ray whose servers all listen on 127.0.0.1 only.

    On Linux, Ray replaces a node address of 127.0.0.1 with the machine's routable one, so the GCS,
    raylet, workers and agents of a "local" Ray listen on every interface. With the flag below set
    to 0 (Ray's switch for single-machine platforms, read when ``ray`` is imported, and inherited
    by every process Ray starts) the node keeps to the loopback: nothing is reachable from the
    network, and a multi-node cluster cannot be joined to it, which a local Ray never is."""
    os.environ[LOOPBACK_ENV] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # already imported: the flag was read then
    ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)


def _outside_placement_groups():
    """Tune runs each trial in a placement group that captures its child tasks; the store actor
    and its training tasks must not live inside (and wait on) one trial's bundle."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=None)


def actor_name(uri: str) -> str:
    return "ptm-store-" + hashlib.sha256(str(CheckpointStore(uri).root).encode()).hexdigest()[:16]


@ray.remote(max_retries=2)
def _train_run(uri: str, spec, epochs: list[int]) -> list[str]:
    """Ray task: pretrain one PTM run and write its checkpoints straight into the store."""
    from .data import load_data
    from .pipeline import pick_device
    from .pool import PTM_DATA_SEED, train_run

    def data():
        return load_data(spec.source, PTM_DATA_SEED).to(pick_device("auto"))

    return train_run(CheckpointStore(uri), spec, epochs, data, progress=False)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class StoreActor:
    """Owns one store's index and its life-time counters; serves checkpoints to trials."""

    def __init__(self, uri: str):
        self.uri = uri
        self.store = CheckpointStore(uri)
        self.inflight: dict[str, tuple[ray.ObjectRef, set[int]]] = {}
        # The trials that wait for a PTM sit idle in ray.get but keep their resources (Tune runs
        # them as actors), so a training task that asked for a whole CPU could wait forever
        # behind them. It asks for no CPU (it uses the CPUs its waiters leave idle) and, on a GPU
        # cluster, half a GPU: studies there should give trials fractional GPUs (README).
        gpus = ray.cluster_resources().get("GPU", 0)
        self.train_options = {"num_cpus": 0, "num_gpus": 0.5 if gpus > 0 else 0}

    async def fetch(self, spec, epoch: int, epochs_to_save: list[int]) -> tuple[dict, ray.ObjectRef, str]:
        """(metadata, ref to {name: ndarray}, outcome) for epoch ``epoch`` of run ``spec``;
        outcome is ``hit``, ``trained`` (this call started the training) or ``shared``. A stored
        checkpoint that fails its sha256 check is quarantined and trained again, never served."""
        key = spec.key(epoch)
        epochs_to_save = sorted({*epochs_to_save, epoch})
        outcome = "hit"
        while (ckpt := load_checked(self.store, key)) is None:
            run = self.inflight.get(spec.run_id)
            if run is None or epoch not in run[1]:
                if run is not None:  # a run under way that will not save this epoch: let it finish
                    await asyncio.wait([asyncio.ensure_future(_await(run[0]))])
                    continue
                ref = _train_run.options(**self.train_options, scheduling_strategy=_outside_placement_groups()
                                         ).remote(self.uri, spec, epochs_to_save)
                self.inflight[spec.run_id] = (ref, set(epochs_to_save))
                starter = True
            else:
                ref, starter = run[0], False
            try:
                written = await ref  # [] when another process had trained it (the store's lock)
            finally:
                if self.inflight.get(spec.run_id, (None,))[0] is ref:
                    del self.inflight[spec.run_id]
            if outcome == "hit" and written:
                outcome = "trained" if starter else "shared"
        if outcome != "trained":
            self.store.count(hits=1)
        arrays = {k: v.numpy() for k, v in ckpt.tensors.items()}
        return ckpt.meta, ray.put(arrays), outcome

    def stats(self) -> dict:
        return {**self.store.stats(), "inflight": len(self.inflight)}


async def _await(ref):
    try:
        await ref
    except Exception:  # the waiting caller retries or reports through its own training
        pass


def get_store_actor(uri: str):
    """The store's actor, created on first use (detached: it outlives the driver)."""
    return StoreActor.options(name=actor_name(uri), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                              scheduling_strategy=_outside_placement_groups()).remote(str(uri))


class RayRepository:
    """Drop-in for :class:`~ptmdd_ray.pool.PTMRepository` that goes through the store actor."""

    def __init__(self, uri: str):
        self.actor = get_store_actor(uri)
        self.trainings = 0
        self.hits = 0

    def get(self, spec, epoch: int, epochs_to_save: list[int], load_source=None) -> Checkpoint:
        meta, ref, outcome = ray.get(self.actor.fetch.remote(spec, epoch, epochs_to_save))
        if outcome == "trained":
            self.trainings += 1
        else:
            self.hits += 1
        arrays = ray.get(ref)
        with warnings.catch_warnings():  # object-store buffers are read-only; load_state_dict copies
            warnings.simplefilter("ignore", UserWarning)
            tensors = {k: torch.from_numpy(np.asarray(a)) for k, a in arrays.items()}
        return Checkpoint(meta["key"], tensors, meta)


__all__ = ["NAMESPACE", "RayRepository", "StoreActor", "actor_name", "get_store_actor", "init_local_ray"]
