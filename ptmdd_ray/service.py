"""The PTM checkpoint store as a Ray service, shared by every trial of every study on a cluster.

One named, detached actor per store location (namespace ``ptmdd``) serves checkpoints: it verifies
a checkpoint's sha256 once, puts its weights into the object store as numpy buffers and hands the
same object to every later caller, so a PTM crosses the network once per node and trials on a node
map it zero-copy. A missing PTM is trained by the trial that first asks for it, under the store's
lock on the run (a flock locally, a lease object on S3: see :mod:`ptmdd_ray.store`), with the
trial's own device and resources; the others wait on the lock, then load. So a PTM is trained
once across trials, nodes and even separate Ray clusters sharing one store, and a training never
waits for resources that the trials waiting on it hold (no deadlock when trials fill every GPU).
Everything durable lives in the :class:`~ptmdd_ray.store.CheckpointStore`: an actor restarted by
Ray (``max_restarts=-1``, on another node if its node died) recovers from storage.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings

import numpy as np
import ray
import torch

from .pool import PTMRepository
from .store import Checkpoint, CheckpointStore, load_checked

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
    keep_to_loopback()
    ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)


def keep_to_loopback() -> None:
    """Make this process (and what it starts) take 127.0.0.1 as its node address: for a local Ray,
    and for a driver joining a cluster that runs on this machine's loopback (docker/local_cluster.sh),
    whose raylet it must find at 127.0.0.1 rather than at the machine's routable address."""
    os.environ[LOOPBACK_ENV] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # already imported: the flag was read then


def _outside_placement_groups():
    """Tune runs each trial in a placement group that captures its child tasks and actors; the
    store actor, shared by every trial, must not live inside (and die with) one trial's bundle."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=None)


def actor_name(uri: str) -> str:
    return "ptm-store-" + hashlib.sha256(str(CheckpointStore(uri).root).encode()).hexdigest()[:16]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=16)
class StoreActor:
    """Serves one store's checkpoints through the object store; counts hits."""

    def __init__(self, uri: str):
        self.store = CheckpointStore(uri)
        self.served: dict[str, tuple[dict, ray.ObjectRef]] = {}  # key -> (meta, weights), verified

    def fetch(self, key: str) -> tuple[dict, ray.ObjectRef] | None:
        """(metadata, ref to {name: ndarray}) of the stored checkpoint ``key``, or None when the
        store does not have it intact (a checkpoint failing its sha256 is quarantined, never
        served). A checkpoint served before is served from the object store again as long as
        the store still records the same sha256."""
        try:
            sha = self.store.meta(key).get("sha256")
        except (OSError, ValueError):
            sha = None
        cached = self.served.get(key)
        if cached is None or cached[0].get("sha256") != sha:
            self.served.pop(key, None)
            ckpt = load_checked(self.store, key) if sha else None
            if ckpt is None:
                return None
            cached = self.served[key] = (ckpt.meta, ray.put({k: v.numpy() for k, v in ckpt.tensors.items()}))
        self.store.count(hits=1)
        return cached

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        """The serving process (a restarted actor has a new one)."""
        return os.getpid()

    def stats(self) -> dict:
        return {**self.store.stats(), "served": len(self.served)}


def get_store_actor(uri: str):
    """The store's actor, created on first use (detached: it outlives the driver)."""
    return StoreActor.options(name=actor_name(uri), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                              scheduling_strategy=_outside_placement_groups()).remote(str(uri))


class RayRepository(PTMRepository):
    """The PTM repository (:class:`~ptmdd_ray.store.CheckpointRepository`) of a trial on Ray:
    stored checkpoints come through the store actor; missing ones are trained here, under the
    store's lock (see the module docstring)."""

    def __init__(self, uri: str):
        super().__init__(CheckpointStore(uri), progress=False)
        self.actor = get_store_actor(uri)

    def stored(self, key: str) -> Checkpoint | None:
        """The checkpoint ``key`` through the actor (weights from the object store), or None if the
        store lacks it. The weights' object belongs to the actor: if the actor died (and restarted)
        after answering, the object is lost with it, and the checkpoint is read from the store
        itself, verified, as a local run would (the actor is a cache, never the only copy)."""
        got = ray.get(self.actor.fetch.remote(key))
        if got is None:
            return None
        meta, ref = got
        try:
            arrays = ray.get(ref)
        except ray.exceptions.ObjectLostError:  # OwnerDiedError included: the actor died meanwhile
            log.warning("the store actor died after serving %s; reading it from the store", key)
            return load_checked(self.store, key)  # the actor counted the hit already
        with warnings.catch_warnings():  # object-store buffers are read-only; load_state_dict copies
            warnings.simplefilter("ignore", UserWarning)
            tensors = {k: torch.from_numpy(np.asarray(a)) for k, a in arrays.items()}
        return Checkpoint(meta["key"], tensors, meta)


@functools.cache
def note_device(gpu_ids: tuple[str, ...]) -> str:
    """Say once per process when Ray assigned GPUs that torch cannot see (a node started with
    ``--num-gpus`` for scheduling only, or a driver/CUDA mismatch): the trial runs on the CPU."""
    cuda = torch.cuda.is_available()
    if gpu_ids and not cuda:
        log.warning("Ray assigned GPU(s) %s to this trial but torch sees no CUDA device: running on the CPU",
                    ",".join(gpu_ids))
    return "cuda" if cuda else "cpu"  # what device: auto picks


def object_store_bytes() -> int | None:
    """Bytes held in this node's object store now (the raylet's own count), or None if the raylet
    does not say. Shows that a study's data set is held once per node, not once per trial."""
    from ray._private.internal_api import node_stats

    node = ray.get_runtime_context().get_node_id()
    try:
        info = next(n for n in ray.nodes() if n["NodeID"] == node)
        reply = node_stats(info["NodeManagerAddress"], info["NodeManagerPort"], include_memory_info=False)
        return int(reply.store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001 - a measurement only: never fail a trial over it
        return None


__all__ = ["NAMESPACE", "RayRepository", "StoreActor", "actor_name", "get_store_actor", "init_local_ray",
           "keep_to_loopback", "note_device", "object_store_bytes"]
