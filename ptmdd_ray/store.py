"""Content-addressed checkpoint store for pre-trained models (PTMs).

A checkpoint is two objects under ``<root>/ptm/``:

- ``<key>.safetensors``: the tensors (safetensors: no pickle, nothing executes on load);
- ``<key>.json``: the metadata (arch, seed, source, epoch, test accuracy, spec hash) and the sha256
  of the tensor file. The JSON is written last, so it is the commit marker: a checkpoint exists iff
  its JSON exists, and a tensor file that does not hash to the recorded sha256 is refused.

Storage goes through ``pyarrow.fs``: a local directory by default, and ``s3://``, ``gs://``,
``hdfs://`` URIs through the same code. Every write goes to a temporary name and is renamed into
place (local) or committed on close (object stores), so a crash never leaves a half checkpoint.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


class IntegrityError(RuntimeError):
    """A checkpoint's bytes do not match its recorded sha256 (truncated, altered or replaced)."""


class StoreError(RuntimeError):
    """The store cannot be read or written (bad URI, permissions, disk full)."""


@dataclass(frozen=True)
class Checkpoint:
    key: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def check_key(key: str) -> str:
    """Keys are flat names: no separators, no ``..``, so nothing can escape the store root."""
    if not KEY_RE.match(key) or ".." in key:
        raise ValueError(f"invalid checkpoint key {key!r}")
    return key


class CheckpointStore:
    """Checkpoints by key under a ``pyarrow.fs`` location (path or URI)."""

    def __init__(self, uri: str | Path):
        uri = str(uri)
        try:
            if "://" in uri:
                self.fs, root = pafs.FileSystem.from_uri(uri)
            else:
                self.fs, root = pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
        except Exception as e:  # pyarrow raises several types for bad URIs
            raise StoreError(f"store: cannot open {uri!r}: {e}") from None
        self.uri = uri
        self.base = root.rstrip("/")
        self.root = self.base + "/ptm"
        self._local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- paths
    def _path(self, key: str, ext: str) -> str:
        return f"{self.root}/{check_key(key)}.{ext}"

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def _write_atomic(self, path: str, payload: bytes, create: str | None = None) -> None:
        try:
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
            raise StoreError(f"store: cannot write {path}: {e.strerror or e}") from None

    def _read(self, path: str) -> bytes:
        if self._local:  # a file planted as a symlink must not make the store read outside itself
            real, base = os.path.realpath(path), os.path.realpath(self.base)
            if not real.startswith(base + os.sep):
                raise IntegrityError(f"store: {path} resolves to {real}, outside the store root {base}")
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def check_writable(self) -> None:
        """Fail early, with the store named, when checkpoints could not be written (a read-only or
        missing location, no permission) rather than after a training."""
        probe = f"{self.root}/.probe-{uuid.uuid4().hex}"
        try:
            self._write_atomic(probe, b"")
            self.fs.delete_file(probe)
        except (StoreError, OSError) as e:
            reason = str(e).split(": ")[-1] if isinstance(e, StoreError) else (e.strerror or e)
            raise StoreError(f"store: {self.uri} is not writable ({reason})") from None

    @contextlib.contextmanager
    def lock(self, name: str, wait: bool = True):
        """Exclusive lock on ``name`` across the processes of this machine (flock on
        ``<root>/locks/<name>.lock``; the kernel drops it if its holder dies, so a crash never
        leaves a stale lock). Two studies with their own local Ray share a local store safely
        this way. Object stores have no such lock: share one through one Ray cluster, whose
        store actor is the single flight. Yields whether the lock is held: with ``wait=False``
        a lock held elsewhere yields False at once instead of blocking."""
        if not self._local:
            yield True
            return
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
            raise StoreError(f"store: cannot list {self.root}: {e}") from None
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
