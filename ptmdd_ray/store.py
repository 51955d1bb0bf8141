"""Content-addressed checkpoint store for pre-trained models (PTMs).

A checkpoint is two objects under ``<root>/ptm/``:

- ``<key>.safetensors``: the tensors (safetensors: no pickle, nothing executes on load);
- ``<key>.json``: the metadata (arch, seed, source, epoch, test accuracy, spec hash) and the sha256
  of the tensor file. The JSON is written last, so it is the commit marker: a checkpoint exists iff
  its JSON exists, and a tensor file that does not hash to the recorded sha256 is refused.

Storage goes through ``pyarrow.fs``: a local directory by default, and ``s3://``, ``gs://``,
``hdfs://`` URIs through the same code. Every write goes to a temporary name and is renamed into
place (local) or committed on close (object stores), so a crash never leaves a half checkpoint.
``s3://`` stores are configured the standard way and locked with leases (:mod:`ptmdd_ray.s3`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pyarrow.fs as pafs
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import IntegrityError, StoreError  # noqa: F401  (raised here; importable from here)
from .s3 import DEFAULT_LEASE_TTL_S, S3Lease, S3Location, S3SetupError, check_conditional_writes

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_WARNED_UNLOCKED: set[str] = set()


@dataclass(frozen=True)
class Checkpoint:
    key: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


class RunSpec(Protocol):
    """What names a PTM's pretraining run (:class:`ptmdd_ray.pool.PTMSpec`): the run's id (what
    its lock is named after) and the key of its checkpoint of each epoch."""

    @property
    def run_id(self) -> str: ...

    def key(self, epoch: int) -> str: ...


@runtime_checkable
class CheckpointRepository(Protocol):
    """Where a pool's PTM checkpoints come from (``run_distill(repo=...)``,
    :func:`ptmdd_ray.pool.resolve_pool`). :meth:`get` returns the checkpoint of ``spec``'s run at
    ``epoch``: the stored one if it is intact, else one this caller trains (every epoch of
    ``epochs_to_save`` the store lacks, on ``load_source()``, under the run's lock) and stores;
    with ``wait=False`` it returns None instead of waiting while another process trains the run.
    ``trainings`` and ``hits`` count what this repository trained and reused.

    Implemented over a local or object store by :class:`ptmdd_ray.pool.PTMRepository`, and
    through the Ray store actor of a cluster by :class:`ptmdd_ray.service.RayRepository`."""

    trainings: int
    hits: int

    def get(self, spec: RunSpec, epoch: int, epochs_to_save: list[int],
            load_source: Callable[[], Any], wait: bool = True) -> Checkpoint | None:
        """With ``wait=False``: None at once while another process trains the run."""


def check_key(key: str) -> str:
    """Keys are flat names: no separators, no ``..``, so nothing can escape the store root."""
    if not KEY_RE.match(key) or ".." in key:
        raise ValueError(f"invalid checkpoint key {key!r}")
    return key


class CheckpointStore:
    """Checkpoints by key under a ``pyarrow.fs`` location (path or URI). Opening one makes no
    network call (for S3 with an endpoint or region set); :meth:`check` and
    :meth:`check_writable` are the early checks. ``lease_ttl`` is the lifetime of an S3 lock
    whose holder stopped renewing it (died)."""

    def __init__(self, uri: str | Path, lease_ttl: float = DEFAULT_LEASE_TTL_S):
        uri = str(uri)
        self.uri, self.lease_ttl = uri, lease_ttl
        self.s3: S3Location | None = None
        try:
            if uri.startswith("s3://"):
                self.s3 = S3Location.parse(uri)
                self.fs, root = self.s3.filesystem(), f"{self.s3.bucket}/{self.s3.prefix}"
            elif "://" in uri:
                self.fs, root = pafs.FileSystem.from_uri(uri)
            else:
                self.fs, root = pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
        except S3SetupError as e:
            raise StoreError(f"store: {self.name}: {e}") from None
        except Exception as e:  # pyarrow raises several types for bad URIs
            raise StoreError(f"store: cannot open {self.name!r}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        self.base = root.rstrip("/")
        self.root = self.base + "/ptm"
        self._local = isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        """The location for messages (an S3 URI without its options and credentials)."""
        if self.s3 is not None:
            return self.s3.display
        return re.sub(r"//[^/@]*@", "//", self.uri.split("?")[0])

    def _fail(self, e: BaseException, doing: str) -> StoreError:
        """One line naming the store and the cause: for S3 the endpoint, bucket or credentials."""
        if self.s3 is not None:
            return StoreError(f"store: {self.name}: {self.s3.explain(e)}")
        return StoreError(f"store: {doing}: {getattr(e, 'strerror', None) or e}")

    # -- paths
    def _path(self, key: str, ext: str) -> str:
        return f"{self.root}/{check_key(key)}.{ext}"

    def _exists(self, path: str) -> bool:
        try:
            return self.fs.get_file_info(path).type == pafs.FileType.File
        except OSError as e:
            raise self._fail(e, f"cannot read {path}") from None

    def _write_atomic(self, path: str, payload: bytes, create: str | None = None) -> None:
        try:
            if self.s3 is None:  # S3 has no directories: a marker object would only cost a request
                self.fs.create_dir(create or self.root, recursive=True)
            if not self._local:  # object stores commit the object on close
                with self.fs.open_output_stream(path) as f:
                    f.write(payload)
                return
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
                self.fs.move(tmp, path)
            finally:
                if self._exists(tmp):
                    self.fs.delete_file(tmp)
        except OSError as e:
            raise self._fail(e, f"cannot write {path}") from None

    def _read(self, path: str) -> bytes:
        """The bytes at ``path``; FileNotFoundError if absent. On S3 any other failure (endpoint,
        credentials) is a one-line StoreError, never taken for a missing file."""
        if self._local:  # a file planted as a symlink must not make the store read outside itself
            real, base = os.path.realpath(path), os.path.realpath(self.base)
            if not real.startswith(base + os.sep):
                raise IntegrityError(f"store: {path} resolves to {real}, outside the store root {base}")
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if self.s3 is None:
                raise
            raise self._fail(e, f"cannot read {path}") from None

    def check(self) -> None:
        """Fail fast, naming the cause, when the store cannot be reached: for S3 an unreachable
        endpoint, a missing bucket or refused credentials (one request, seconds at most with the
        bounded retries). A local directory needs no check (a missing one is an empty store)."""
        if self.s3 is None:
            return
        try:
            info = self.fs.get_file_info(self.s3.bucket)
        except OSError as e:
            raise self._fail(e, "check") from None
        if info.type == pafs.FileType.NotFound:
            raise StoreError(f"store: {self.name}: bucket '{self.s3.bucket}' does not exist")

    def check_writable(self) -> None:
        """Fail early, with the store named, when checkpoints could not be written (a read-only or
        missing location, no permission; on S3 also an unreachable endpoint, a missing bucket, bad
        credentials, or no boto3 or conditional writes for the lock) rather than after a training.
        Leaves nothing behind."""
        self.check()
        probe = f"{self.root}/.probe-{uuid.uuid4().hex}"
        try:
            self._write_atomic(probe, b"")
            self.fs.delete_file(probe)
        except (StoreError, OSError) as e:
            reason = str(e).split(": ")[-1] if isinstance(e, StoreError) else (e.strerror or e)
            raise StoreError(f"store: {self.name} is not writable ({reason})") from None
        if self.s3 is not None:
            try:
                check_conditional_writes(self.s3)
            except Exception as e:  # boto3 missing, or any S3 failure: one line
                raise self._fail(e, "lock") from None

    @contextlib.contextmanager
    def lock(self, name: str, wait: bool = True):
        """Exclusive lock on ``name`` across processes. Yields whether the lock is held: with
        ``wait=False`` a lock held elsewhere yields False at once instead of blocking.

        A local store uses flock on ``<root>/locks/<name>.lock`` (the kernel drops it if its
        holder dies, so a crash never leaves a stale lock): studies with their own local Ray share
        a local store safely. An ``s3://`` store uses a lease object, ``locks/<name>.lease``
        (:class:`~ptmdd_ray.s3.S3Lease`), renewed while held and expiring ``lease_ttl`` seconds
        after its holder died: processes on any machines share an S3 store safely. Other object
        stores (gs://, hdfs://) have no lock: share one through one Ray cluster, whose store actor
        is the single flight."""
        check_key(name)
        if self.s3 is not None:
            with self._lease(name, wait) as held:
                yield held
        elif self._local:
            with self._flock(name, wait) as held:
                yield held
        else:
            if self.name not in _WARNED_UNLOCKED:
                _WARNED_UNLOCKED.add(self.name)
                log.warning("store %s: no lock on this kind of store; share it through one Ray cluster", self.name)
            yield True

    @contextlib.contextmanager
    def _lease(self, name: str, wait: bool):
        lease = S3Lease(self.s3, name, self.lease_ttl)
        try:
            held = lease.acquire(wait)
        except Exception as e:  # boto3 missing, or an S3 failure: one line
            raise self._fail(e, f"cannot lock {name}") from None
        try:
            yield held
        finally:
            if held:
                lease.release()

    @contextlib.contextmanager
    def _flock(self, name: str, wait: bool):
        locks = f"{self.base}/locks"
        try:
            os.makedirs(locks, exist_ok=True)
            fd = os.open(f"{locks}/{check_key(name)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"store: cannot lock {name} under {locks}: {e.strerror or e}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    # -- API
    def has(self, key: str) -> bool:
        return self._exists(self._path(key, "json"))

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
        """Write a checkpoint; returns its metadata including ``sha256`` and ``bytes``."""
        payload = st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                          metadata={"meta": json.dumps(meta, sort_keys=True)})
        meta = dict(meta, key=key, sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))
        self._write_atomic(self._path(key, "safetensors"), payload)
        self._write_atomic(self._path(key, "json"), json.dumps(meta, sort_keys=True, indent=1).encode())
        return meta

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads(self._read(self._path(key, "json")))

    def load(self, key: str) -> Checkpoint:
        """Read and verify a checkpoint. Raises :class:`IntegrityError` if the tensor file does not
        hash to the recorded sha256; the tensors are parsed only after the check passes."""
        meta = self.meta(key)
        path = self._path(key, "safetensors")
        try:
            payload = self._read(path)
        except FileNotFoundError:
            raise IntegrityError(f"checkpoint {key}: tensor file missing: {path}") from None
        digest = hashlib.sha256(payload).hexdigest()
        if digest != meta.get("sha256"):
            raise IntegrityError(f"checkpoint {key}: sha256 mismatch for {path} (file altered or truncated)")
        return Checkpoint(key, st_load(payload), meta)

    def quarantine(self, key: str) -> str:
        """Move a checkpoint that failed its check out of the way (marker first, so it is absent
        at once) into ``<root>/quarantine/`` for inspection; returns where it went."""
        dest = f"{self.base}/quarantine"
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{uuid.uuid4().hex[:6]}"
        self.fs.create_dir(dest, recursive=True)
        for ext in ("json", "safetensors"):
            p = self._path(key, ext)
            if self.fs.get_file_info(p).type != pafs.FileType.NotFound:
                self.fs.move(p, f"{dest}/{key}.{stamp}.{ext}")
        log.warning("checkpoint %s failed its integrity check; moved to %s", key, dest)
        return dest

    def delete(self, key: str) -> None:
        for ext in ("json", "safetensors"):  # marker first: a half-deleted checkpoint is absent
            p = self._path(key, ext)
            if self._exists(p):
                self.fs.delete_file(p)

    def keys(self) -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError as e:
            raise self._fail(e, f"cannot list {self.root}") from None
        return sorted(Path(i.path).name[: -len(".json")] for i in infos
                      if i.type == pafs.FileType.File and i.path.endswith(".json"))

    def ls(self) -> list[dict[str, Any]]:
        return [self.meta(k) for k in self.keys()]

    # -- small JSON records beside the checkpoints (results worth computing once), in records/
    def _record_path(self, name: str) -> str:
        return f"{self.base}/records/{check_key(name)}.json"

    def record(self, name: str) -> dict[str, Any] | None:
        """The record ``name``, or None if it is missing or unreadable (then it is recomputed)."""
        try:
            return json.loads(self._read(self._record_path(name)))
        except (OSError, ValueError):
            return None

    def put_record(self, name: str, data: dict[str, Any]) -> None:
        self._write_atomic(self._record_path(name), json.dumps(data, sort_keys=True).encode(),
                           create=f"{self.base}/records")

    # -- life-time counters (trainings run, checkpoints served from the store), in counters.json
    def _counters_path(self) -> str:
        return self.base + "/counters.json"

    def counters(self) -> dict[str, int]:
        try:
            data = json.loads(self._read(self._counters_path()))
        except (FileNotFoundError, OSError, ValueError):
            data = {}
        return {"trainings": int(data.get("trainings", 0)), "hits": int(data.get("hits", 0))}

    def count(self, trainings: int = 0, hits: int = 0) -> None:
        """Add to the life-time counters (read-modify-write; the store actor is the one writer
        when the store is shared through Ray)."""
        with self.lock("counters"):
            c = self.counters()
            c["trainings"] += trainings
            c["hits"] += hits
            self._write_atomic(self._counters_path(), json.dumps(c).encode(), create=self.base)

    def stats(self) -> dict[str, int]:
        metas = self.ls()
        return {"checkpoints": len(metas), **self.counters(), "bytes": sum(int(m.get("bytes", 0)) for m in metas)}

    def gc(self) -> dict[str, int]:
        """Remove what no committed, intact checkpoint owns: temporary files of interrupted
        writes, tensor files without their JSON marker, and checkpoints that fail their sha256."""
        removed = {"temporary": 0, "orphaned": 0, "corrupt": 0}
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        names = {Path(i.path).name for i in infos if i.type == pafs.FileType.File}
        for name in names:
            path = f"{self.root}/{name}"
            if ".tmp-" in name:
                self.fs.delete_file(path)
                removed["temporary"] += 1
            elif name.endswith(".safetensors") and name[: -len(".safetensors")] + ".json" not in names:
                self.fs.delete_file(path)
                removed["orphaned"] += 1
        for key in self.keys():
            try:
                self.load(key)
            except IntegrityError:
                self.delete(key)
                removed["corrupt"] += 1
        return removed


def load_checked(store: CheckpointStore, key: str) -> Checkpoint | None:
    """The checkpoint if the store has it intact; None if it is missing or fails its sha256
    check, in which case it is quarantined (never loaded) so that it is trained again."""
    if not store.has(key):
        return None
    try:
        return store.load(key)
    except IntegrityError as e:
        log.warning("%s", e)
        store.quarantine(key)
        return None
