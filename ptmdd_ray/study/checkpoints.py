"""A trial's distillation state as Tune checkpoints, found again after a retry or a resume."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class TuneCheckpoints:
    """A trial's distillation state kept as Tune checkpoints (see
    :class:`ptmdd_ray.pipeline.Checkpoints`): a retried attempt (its worker died) or a resumed study
    (its driver died) goes on from the last one instead of iteration 0. One safetensors file named
    by the trial's key: tensors plus JSON, nothing pickled.

    Tune hands a retried attempt its last checkpoint, but a driver killed between a trial's
    checkpoint and Tune's next snapshot of the experiment forgets it (a trial created after that
    snapshot even comes back in a new directory); so the experiment's storage (``experiment_uri``,
    local or ``pyarrow.fs``) is searched for this trial's states too, and the latest one wins."""

    def __init__(self, every: int, key: str, experiment_uri: str | None = None):
        self.every, self.key, self.experiment_uri = every, key, experiment_uri
        self.file = f"distill_state-{key}.safetensors"
        self.seconds = {"load": 0.0, "save": 0.0}  # spent looking for states and saving them

    def load(self):
        t0 = time.perf_counter()
        try:
            return self._load()
        finally:
            self.seconds["load"] += time.perf_counter() - t0

    def _load(self):
        from ray import tune

        from ..methods import DistillState

        ckpt = tune.get_checkpoint()
        given = f"{ckpt.path}/{self.file}" if ckpt is not None else None
        found = [self._read(given, ckpt.filesystem)] if ckpt is not None else []
        found = [f for f in found + self._stored(skip=given) if f is not None]
        if not found:
            return None
        tensors, meta = max(found, key=lambda f: f[1]["state"]["iteration"])
        return DistillState.from_parts(tensors, meta["state"]), meta["extra"]

    def save(self, state, extra: dict[str, Any]) -> None:
        import tempfile

        from ray import tune

        from ..artifacts import write_tensors

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            write_tensors(Path(d, self.file), state.tensors(), {"state": state.meta(), "extra": extra, "key": self.key})
            tune.report({"distill.iteration": state.iteration, "distill.checkpoint": state.iteration,
                         "trial.final": 0.0}, checkpoint=tune.Checkpoint.from_directory(d))
        self.seconds["save"] += time.perf_counter() - t0

    def _stored(self, skip: str | None = None) -> list:
        """This trial's states anywhere under the experiment (``<trial dir>/checkpoint_*/``) but
        ``skip``, the one Tune handed back (already read; usually among them)."""
        import pyarrow.fs as pafs

        if not self.experiment_uri:
            return []
        fs, where = pafs.FileSystem.from_uri(self.experiment_uri) if "://" in self.experiment_uri else (
            pafs.LocalFileSystem(), str(Path(self.experiment_uri).resolve()))
        try:
            infos = fs.get_file_info(pafs.FileSelector(where, allow_not_found=True, recursive=True))
        except OSError:
            return []
        local = isinstance(fs, pafs.LocalFileSystem)
        norm = os.path.realpath if local else os.path.normpath
        skipped = norm(skip) if skip else None
        return [self._read(i.path, fs) for i in infos if i.base_name == self.file and norm(i.path) != skipped]

    def _read(self, path: str, fs):
        """(tensors, meta) of a saved state, or None if it is not whole or not this trial's."""
        import tempfile

        import pyarrow.fs as pafs

        from ..artifacts import read_tensors

        try:
            with tempfile.TemporaryDirectory() as d:
                pafs.copy_files(path, str(Path(d, self.file)), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
                tensors, meta = read_tensors(Path(d, self.file))
        except Exception as e:  # noqa: BLE001 - a checkpoint cut off mid-write is no checkpoint
            log.info("ignoring an unreadable distillation checkpoint %s: %s", path, e)
            return None
        return (tensors, meta) if meta.get("key") == self.key else None

