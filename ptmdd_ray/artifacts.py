"""What a run leaves behind: ``synthetic.parquet``, ``synthetic.png`` and ``result.json``.

The synthetic set is a Parquet table, one row per image (``label``, ``pixels`` as a float32 list in
normalised units), with the resolved config, normalisation and shape in the schema metadata: any
Arrow reader can load it, and loading it executes nothing. All files are written to a temporary
name and renamed into place, so a crash never leaves a half-written artifact.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from .config import ConfigError

META_KEY = b"ptmdd"
FORMAT_VERSION = 1


def write_atomic(path: str | Path, payload: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically to a local path or a ``pyarrow.fs`` URI (``s3://...``: an object
    store commits the object on close, whole or not at all)."""
    payload = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    if "://" not in str(path):
        return write_atomic(path, payload)
    import pyarrow.fs as pafs

    fs, where = pafs.FileSystem.from_uri(str(path))
    fs.create_dir(where.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(where) as f:
        f.write(payload)


def read_json(path: str | Path) -> Any | None:
    """The JSON at a local path or ``pyarrow.fs`` URI, or None if there is none."""
    try:
        if "://" not in str(path):
            return json.loads(Path(path).read_text())
        import pyarrow.fs as pafs

        fs, where = pafs.FileSystem.from_uri(str(path))
        with fs.open_input_stream(where) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Tensors and JSON metadata in one safetensors file, atomically (a state to resume from)."""
    from safetensors.torch import save

    payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                   metadata={META_KEY.decode(): json.dumps(meta)})
    write_atomic(path, payload)


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What :func:`write_tensors` wrote; nothing in the file is executed (no pickle)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[META_KEY.decode()])


def synthetic_table(images: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any]) -> pa.Table:
    n = images.shape[0]
    flat = images.detach().cpu().float().reshape(n, -1).numpy()
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), flat.shape[1])
    table = pa.table({"label": pa.array(labels.cpu().numpy().astype(np.int32)), "pixels": pixels})
    meta = dict(meta, shape=list(images.shape[1:]), format_version=FORMAT_VERSION)
    return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def write_synthetic(path: str | Path, images: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any]) -> None:
    buf = io.BytesIO()
    pq.write_table(synthetic_table(images, labels, meta), buf)
    write_atomic(path, buf.getvalue())


def read_synthetic(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Load a synthetic set written by :func:`write_synthetic`; one-line ConfigError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"synthetic: file not found: {path}")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise ConfigError(f"synthetic: {path} is not a readable Parquet file ({type(e).__name__})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None or not {"label", "pixels"} <= set(table.column_names):
        raise ConfigError(f"synthetic: {path} is not a ptmdd synthetic set (needs label, pixels and metadata)")
    try:  # the metadata is JSON and the columns plain numbers: nothing here can run code
        meta = json.loads(raw)
        shape = [int(s) for s in meta["shape"]]
        pixels = table.column("pixels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        images = torch.from_numpy(np.asarray(pixels, np.float32).copy()).reshape(-1, *shape)
        labels = torch.from_numpy(np.array(table.column("label").to_numpy(zero_copy_only=False), np.int64))
    except Exception as e:  # noqa: BLE001 - any malformed content is the same bad input
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise ConfigError(f"synthetic: {path} has malformed content ({reason})") from None
    if len(labels) != len(images):
        raise ConfigError(f"synthetic: {path} has {len(labels)} labels for {len(images)} images")
    return images, labels, meta


def grid_png(images01: torch.Tensor, labels: torch.Tensor, num_classes: int, scale: int | None = None) -> bytes:
    """A PNG grid, one row per class, from images in [0, 1] pixel units."""
    x = images01.detach().cpu().clamp(0, 1)
    c, h, w = x.shape[1:]
    scale = scale or max(1, 64 // h)
    per_class = [x[labels == k] for k in range(num_classes)]
    cols = max(1, max(t.shape[0] for t in per_class))
    pad = 2
    canvas = np.ones(((h * scale + pad) * num_classes + pad, (w * scale + pad) * cols + pad, 3), np.float32)
    for r, row in enumerate(per_class):
        for k, img in enumerate(row):
            arr = img.numpy().transpose(1, 2, 0)
            arr = np.repeat(np.repeat(arr, scale, 0), scale, 1)
            if c == 1:
                arr = np.repeat(arr, 3, 2)
            y0, x0 = pad + r * (h * scale + pad), pad + k * (w * scale + pad)
            canvas[y0:y0 + h * scale, x0:x0 + w * scale] = arr
    buf = io.BytesIO()
    Image.fromarray((canvas * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
