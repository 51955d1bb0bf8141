"""Image data: one loader for every source, returning normalised CPU tensors.

Sources are sklearn's bundled ``digits`` (offline, used by tests and smoke runs), torchvision data sets,
a Parquet table of encoded images (``parquet:PATH``) and an ImageFolder tree (``imagefolder:PATH``).
Decoding is the slow part, so :func:`load_uint8` decodes once into a ``.npz`` cache (no pickle) and an
in-process LRU cache; :func:`load_data` then applies class subsetting, seeded per-class subsets,
resizing, the domain transform and normalisation as vectorised tensor ops. Problems with the user's
data surface as :class:`ConfigError` naming the config key, never as a stack trace from Pillow.
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import stat
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import DOMAINS, ConfigError, DatasetConfig

logger = logging.getLogger(__name__)

__all__ = ["DOMAINS", "ImageData", "check_dataset_config", "load_data", "load_uint8"]

# name -> (torchvision class, path under root whose presence means "already downloaded")
TORCHVISION = {
    "cifar10": ("CIFAR10", ("cifar-10-batches-py",)),
    "cifar100": ("CIFAR100", ("cifar-100-python",)),
    "mnist": ("MNIST", ("MNIST/raw",)),
    "fashionmnist": ("FashionMNIST", ("FashionMNIST/raw",)),
    "svhn": ("SVHN", ("train_32x32.mat", "test_32x32.mat")),
}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "mnist": 10, "fashionmnist": 10, "svhn": 10}
KNOWN = ", ".join([*NUM_CLASSES, "parquet:PATH", "imagefolder:PATH"])
IMAGE_COLUMNS = ("jpeg", "png", "image", "bytes")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "F"}
CACHE_VERSION = 1  # bump when the cached array layout changes
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]


def _parse_name(name: str, key: str) -> tuple[str, str | None]:
    """``(kind, absolute path or None)``; kind is a built-in name, ``parquet`` or ``imagefolder``."""
    if name.lower() in NUM_CLASSES:
        return name.lower(), None
    for kind in ("parquet", "imagefolder"):
        if name.startswith(kind + ":"):
            path = name[len(kind) + 1:].strip()
            if not path:
                raise ConfigError(f"{key}.name: {kind}: needs a path ({kind}:PATH)")
            return kind, os.path.abspath(os.path.expanduser(path))
    raise ConfigError(f"{key}.name: unknown dataset {name!r} (known: {KNOWN})")


def _parquet_schema(path: str, key: str):
    import pyarrow.parquet as pq
    try:
        return pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is the user's file
        raise ConfigError(f"{key}.name: cannot read parquet file {path} ({type(e).__name__})") from None


def check_dataset_config(ds: DatasetConfig, key: str) -> None:
    """Validate ``ds`` without decoding images, so a bad config fails before any work is queued."""
    kind, path = _parse_name(ds.name, key)
    if kind == "parquet":
        if not os.path.isfile(path):
            raise ConfigError(f"{key}.name: parquet file not found: {path}")
        _parquet_schema(path, key)
    elif kind == "imagefolder":
        for split in ("train", "test"):
            if not os.path.isdir(os.path.join(path, split)):
                raise ConfigError(f"{key}.name: image folder {path} has no '{split}' subfolder")
    elif kind in TORCHVISION and not ds.download:
        root = os.path.expanduser(ds.root)
        if not all(os.path.exists(os.path.join(root, m)) for m in TORCHVISION[kind][1]):
            raise ConfigError(f"{key}.root: no {kind} data under {root} (set {key}.download: true to fetch it)")
    if ds.domain not in DOMAINS:
        raise ConfigError(f"{key}.domain: unknown domain {ds.domain!r} (known: {', '.join(DOMAINS)})")
    if ds.im_size is not None and not 8 <= ds.im_size <= 64:
        raise ConfigError(f"{key}.im_size: must be in 8..64, got {ds.im_size}")
    for f in ("train_per_class", "test_per_class"):
        v = getattr(ds, f)
        if v is not None and v < 1:
            raise ConfigError(f"{key}.{f}: must be >= 1, got {v}")
    if ds.val_per_class < 0:
        raise ConfigError(f"{key}.val_per_class: must be >= 0 (0: no validation split), got {ds.val_per_class}")
    if ds.classes is not None:
        if not ds.classes:
            raise ConfigError(f"{key}.classes: must list at least one class")
        seen: set[int] = set()
        for c in ds.classes:
            if c < 0:
                raise ConfigError(f"{key}.classes: negative class {c}")
            if c in seen:
                raise ConfigError(f"{key}.classes: duplicate class {c}")
            if kind in NUM_CLASSES and c >= NUM_CLASSES[kind]:
                raise ConfigError(f"{key}.classes: class {c} not in 0..{NUM_CLASSES[kind] - 1}")
            seen.add(c)


# --------------------------------------------------------------------------- decoding

def _decode_images(blobs: list, where) -> np.ndarray:
    """Encoded images -> uint8 (N, H, W, C). Mode (L or RGB) follows the majority of the first 256
    headers and the size follows the first image, so one odd file cannot change the array's shape.
    ``where(i)`` describes item i for the error message."""
    from PIL import Image

    def open_(i):
        try:
            if blobs[i] is None:
                raise ValueError("null")
            return Image.open(io.BytesIO(blobs[i]))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"dataset.name: cannot decode image at {where(i)} ({type(e).__name__})") from None

    if not blobs:
        return np.zeros((0, 1, 1, 1), np.uint8)
    heads = [open_(i) for i in range(min(len(blobs), 256))]
    mode = "L" if sum(h.mode in GRAY_MODES for h in heads) * 2 > len(heads) else "RGB"
    size = heads[0].size
    out = np.empty((len(blobs), size[1], size[0], 1 if mode == "L" else 3), np.uint8)
    for i in range(len(blobs)):
        im = heads[i] if i < len(heads) else open_(i)
        try:
            im = im.convert(mode)
            if im.size != size:
                im = im.resize(size, Image.BILINEAR)
            out[i] = np.asarray(im).reshape(out.shape[1:])
        except Exception as e:  # noqa: BLE001 - truncated data fails on load, not on open
            raise ConfigError(f"dataset.name: cannot decode image at {where(i)} ({type(e).__name__})") from None
    return out


def _read_parquet(path: str) -> Arrays:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _parquet_schema(path, "dataset")
    img = next((c for c in IMAGE_COLUMNS if c in schema.names), None)
    if img is None:
        raise ConfigError(f"dataset.name: parquet file {path} has no image column (one of {', '.join(IMAGE_COLUMNS)})")
    for col in ("label", "split"):
        if col not in schema.names:
            raise ConfigError(f"dataset.name: parquet file {path} has no '{col}' column")
    if not pa.types.is_integer(schema.field("label").type):
        raise ConfigError(f"dataset.name: parquet file {path}: 'label' must be an integer column")
    table = pq.read_table(path, columns=[img, "label", "split"])
    if table["label"].null_count:
        raise ConfigError(f"dataset.name: parquet file {path}: 'label' has nulls")
    labels = table["label"].to_numpy().astype(np.int64)
    split = np.asarray(table["split"].cast(pa.string()).to_pylist(), dtype=object)
    blobs = table[img].to_pylist()
    if blobs and isinstance(blobs[0], dict):  # Hugging Face layout: struct<bytes, path>
        blobs = [b and b.get("bytes") for b in blobs]
    if labels.size and labels.min() < 0:
        raise ConfigError(f"dataset.name: parquet file {path}: negative label {labels.min()}")
    meta = schema.metadata or {}
    if b"classes" in meta:
        names = [s.strip() for s in meta[b"classes"].decode().split(",")]
        if labels.size and labels.max() >= len(names):
            raise ConfigError(f"dataset.name: parquet file {path}: label {labels.max()} but {len(names)} class names")
    else:
        names = [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
    out = []
    for s in ("train", "test"):
        rows = np.flatnonzero(split == s)
        if rows.size == 0:
            raise ConfigError(f"dataset.name: parquet file {path} has no '{s}' rows in 'split'")
        x = _decode_images([blobs[r] for r in rows], lambda i, rows=rows: f"row {rows[i]} of {path}")
        out += [x, labels[rows]]
    return (*out, names)


def _read_imagefolder(path: str) -> Arrays:
    root = Path(path)
    names = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    out = []
    for split in ("train", "test"):
        files, labels = [], []
        for d in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            if d.name not in names:
                raise ConfigError(f"dataset.name: {d} is a class that {root / 'train'} does not have")
            fs = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS)
            files += fs
            labels += [names.index(d.name)] * len(fs)
        if not files:
            raise ConfigError(f"dataset.name: no images under {root / split}")
        out += [_decode_images([f.read_bytes() for f in files], lambda i, fs=files: str(fs[i])),
                np.asarray(labels, np.int64)]
    return (*out, names)


def _read_torchvision(kind: str, root: str, download: bool) -> Arrays:
    import torchvision.datasets as tvd
    cls = getattr(tvd, TORCHVISION[kind][0])
    try:
        if kind == "svhn":
            sets = [cls(root, split=s, download=download) for s in ("train", "test")]
        else:
            sets = [cls(root, train=t, download=download) for t in (True, False)]
    except Exception as e:  # noqa: BLE001 - missing/corrupt files, no network
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"dataset.root: cannot load {kind} from {root}: {msg}") from None
    out = []
    for s in sets:
        x = np.asarray(s.data)
        x = x.transpose(0, 2, 3, 1) if kind == "svhn" else (x[..., None] if x.ndim == 3 else x)
        y = np.asarray(s.labels if kind == "svhn" else s.targets, dtype=np.int64)
        out += [np.ascontiguousarray(x, dtype=np.uint8), y]
    names = [str(i) for i in range(10)] if kind == "svhn" else list(sets[0].classes)
    return (*out, names)


def _read_digits() -> Arrays:
    """sklearn digits, split 80/20 per class with a fixed seed 0 so every run sees the same test set."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.rint(d.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: round(0.2 * (y == c).sum())]
                           for c in range(10)])
    is_test = np.zeros(len(y), bool)
    is_test[test] = True
    return x[~is_test], y[~is_test], x[is_test], y[is_test], [str(i) for i in range(10)]


# --------------------------------------------------------------------------- caching

def _signature(kind: str, src: str) -> tuple:
    """What identifies the source's content cheaply: size and mtime of its files."""
    if kind == "imagefolder":
        return tuple((str(p.relative_to(src)), p.stat().st_size, p.stat().st_mtime_ns)
                     for split in ("train", "test") for p in sorted(Path(src, split).rglob("*")) if p.is_file())
    paths = [src] if kind == "parquet" else [os.path.join(src, m) for m in TORCHVISION[kind][1]]
    return tuple((os.stat(p).st_size, os.stat(p).st_mtime_ns) if os.path.exists(p) else None for p in paths)


def _writable(d: Path) -> bool:
    """True if ``d`` (or the ancestor it would be created in) may be written. Checks the permission bits
    too, so a read-only shared folder is respected even when running as root."""
    p = d
    while not p.exists() and p != p.parent:
        p = p.parent
    write_bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    return p.is_dir() and os.access(p, os.W_OK) and bool(p.stat().st_mode & write_bits)


def _cache_dirs(kind: str, src: str, cache_dir: str | None) -> list[Path]:
    if cache_dir:
        first = Path(cache_dir).expanduser()
    elif kind in TORCHVISION:
        first = Path(src) / ".cache"
    else:
        first = Path(src).parent / ".ptmdd_cache"
    home = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ptmdd_ray"
    return [first] if first == home else [first, home]


def _cache_name(kind: str, src: str, sig: tuple) -> str:
    digest = hashlib.sha256(repr((CACHE_VERSION, kind, src, sig)).encode()).hexdigest()[:20]
    return f"{kind}-{Path(src).stem if kind in ('parquet', 'imagefolder') else 'tv'}-{digest}.npz"


def _cache_read(dirs: list[Path], fname: str) -> Arrays | None:
    for d in dirs:
        f = d / fname
        if f.is_file():
            try:
                with np.load(f, allow_pickle=False) as z:
                    arrs = tuple(z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
                    return (*arrs, [str(s) for s in z["classes"]])
            except Exception as e:  # noqa: BLE001 - a broken cache is rebuilt, not fatal
                logger.warning("ignoring unreadable cache %s (%s)", f, type(e).__name__)
    return None


def _cache_write(dirs: list[Path], fname: str, arrs: Arrays) -> None:
    """Atomic: write a temp file in the target dir, then ``os.replace``, so concurrent workers never
    read a half-written cache."""
    x_tr, y_tr, x_te, y_te, names = arrs
    for d in dirs:
        if not _writable(d):
            continue
        tmp = None
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=fname + ".", suffix=".tmp", dir=d)
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, classes=np.asarray(names, dtype=str))
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is meant to be shared
            os.replace(tmp, d / fname)
            logger.info("cached decoded images at %s", d / fname)
            return
        except OSError as e:
            logger.warning("cannot write cache in %s (%s)", d, e)
            if tmp and os.path.exists(tmp):
                os.remove(tmp)
    logger.warning("no writable cache directory among %s; images will be decoded again next time", dirs)


@functools.lru_cache(maxsize=4)
def _load_uint8_cached(kind: str, src: str | None, sig: tuple, download: bool, cache_dir: str | None) -> Arrays:
    if kind == "digits":
        arrs = _read_digits()
    else:
        dirs = _cache_dirs(kind, src, cache_dir)
        fname = _cache_name(kind, src, sig)
        arrs = _cache_read(dirs, fname) if None not in sig else None
        if arrs is None:
            logger.info("decoding %s from %s", kind, src)
            if kind == "parquet":
                arrs = _read_parquet(src)
            elif kind == "imagefolder":
                arrs = _read_imagefolder(src)
            else:
                arrs = _read_torchvision(kind, src, download)
                fname = _cache_name(kind, src, _signature(kind, src))  # files may be new after download
            _cache_write(dirs, fname, arrs)
    for a in arrs[:4]:
        a.setflags(write=False)  # shared between callers through the LRU cache
    return arrs


def _source(ds: DatasetConfig, key: str) -> tuple[str, str | None]:
    """``(kind, absolute location)`` of what ``ds`` reads (None for the bundled digits)."""
    kind, path = _parse_name(ds.name, key)
    if path is None and kind != "digits":
        path = os.path.abspath(os.path.expanduser(ds.root))
    return kind, path


def load_uint8(ds: DatasetConfig, *, key: str = "dataset") -> Arrays:
    """Raw ``(x_train, y_train, x_test, y_test, class_names)``: x uint8 (N, H, W, C), y int64, before any
    subset, resize or domain. Arrays are read-only (shared through an in-process cache)."""
    kind, src = _source(ds, key)
    if kind in ("parquet", "imagefolder"):
        check_dataset_config(replace(ds, classes=None), key)  # path existence, with the right message
    sig = () if kind == "digits" else _signature(kind, src)
    return _load_uint8_cached(kind, src, sig, bool(ds.download), ds.cache_dir)


def source_id(ds: DatasetConfig, *, key: str = "dataset") -> str:
    """A short digest of what ``ds`` reads: its kind, absolute location and the size and mtime of
    its files. Results computed from the data (a cached baseline) are keyed on it, so that a
    relative path read from another directory, or a rewritten file, is a different source."""
    kind, src = _source(ds, key)
    if src is None:
        return kind
    return hashlib.sha256(repr((kind, src, _signature(kind, src))).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- tensors

_SPLITS = ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val", "train_ids", "val_ids")


@dataclass
class ImageData:
    """Normalised train/test(/validation) tensors plus what is needed to undo the normalisation.

    ``x_val``/``y_val`` are the held-out validation split (``dataset.val_per_class``; empty without
    one). ``train_ids``/``val_ids`` are the rows of the source's own training split that
    ``x_train``/``x_val`` came from: the record that the two never overlap."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    train_ids: torch.Tensor | None = None
    val_ids: torch.Tensor | None = None
    _class_idx: list[torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def im_size(self) -> int:
        return int(self.x_train.shape[2])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_val(self) -> bool:
        return self.y_val is not None and self.y_val.numel() > 0

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the ``test`` or ``val`` split."""
        if name == "val":
            if not self.has_val:
                raise ConfigError("dataset.val_per_class: a validation metric needs a validation split (set it > 0)")
            return self.x_val, self.y_val
        return self.x_test, self.y_test

    def class_indices(self) -> list[torch.Tensor]:
        """Per class, int64 indices into ``x_train`` (cached: real-batch sampling calls this every step)."""
        if self._class_idx is None:
            order = torch.argsort(self.y_train, stable=True)
            counts = torch.bincount(self.y_train, minlength=self.num_classes).tolist()
            self._class_idx = list(torch.split(order, counts))
        return self._class_idx

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _SPLITS if getattr(self, k) is not None}

    def to(self, device) -> ImageData:
        ids = ("train_ids", "val_ids")  # bookkeeping: stays on the CPU
        moved = {k: v if k in ids else v.to(device) for k, v in self._tensors().items()}
        out = ImageData(self.name, classes=list(self.classes), mean=self.mean, std=self.std, **moved)
        if self._class_idx is not None:
            out._class_idx = [i.to(device) for i in self._class_idx]
        return out

    def to_arrays(self) -> dict:
        """Plain numpy arrays plus metadata: the form a study puts into the Ray object store,
        from which every trial on a node maps the same read-only buffers (zero-copy)."""
        return {"name": self.name, "classes": list(self.classes), "mean": self.mean, "std": self.std,
                **{k: v.cpu().numpy() for k, v in self._tensors().items()}}

    @classmethod
    def from_arrays(cls, d: dict) -> ImageData:
        """Inverse of :meth:`to_arrays` without copying: the tensors view the given buffers (which
        may be read-only; nothing in the package writes into a data set's tensors)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable array" from torch.from_numpy
            t = {k: torch.from_numpy(d[k]) for k in _SPLITS if k in d}
        return cls(d["name"], classes=list(d["classes"]), mean=tuple(d["mean"]), std=tuple(d["std"]), **t)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixel units (not clipped); works for (N, C, H, W) and (C, H, W)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x * std + mean


# The validation split is drawn with this fixed seed, per class of the source's full label space:
# the same images are held out for every run seed, trial, class subset and domain of those files.
VAL_SEED = 2310_03295


def holdout(y: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices of ``n`` images per class of ``y`` (all of a class with fewer), seeded by
    :data:`VAL_SEED` and the class alone."""
    if n <= 0:
        return np.zeros(0, np.int64)
    picks = [np.random.default_rng([VAL_SEED, int(c)]).permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _per_class_subset(y: np.ndarray, n: int | None, k: int, rng: np.random.Generator) -> np.ndarray:
    if n is None:
        return np.arange(len(y))
    picks = [rng.permutation(np.flatnonzero(y == c))[:n] for c in range(k)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def _to_float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[0] == 0:
        return x.new_zeros((0, x.shape[1], size, size))
    if x.shape[2:] == (size, size):
        return x
    down = size < x.shape[2] or size < x.shape[3]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=down)


def _domain(x: torch.Tensor, domain: str) -> torch.Tensor:
    """Derived domains keep channels and size, so the same architectures apply."""
    if domain == "grayscale" and x.shape[1] == 3:
        lum = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        return lum.expand(-1, 3, -1, -1).contiguous()
    if domain == "lowres" and x.shape[0]:
        h, w = x.shape[2:]
        small = F.interpolate(x, size=(max(1, h // 4), max(1, w // 4)), mode="area")
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    if domain == "invert":
        return 1.0 - x
    return x


def load_data(ds: DatasetConfig, seed: int = 0, *, key: str = "dataset") -> ImageData:
    """Load, subset, resize, transform and normalise. ``seed`` only picks the per-class subsets; the
    train/test split itself never depends on it."""
    check_dataset_config(ds, key)
    x_tr, y_tr, x_te, y_te, names = load_uint8(ds, key=key)
    # validation first, on the full label space: nothing below (subset, class choice) can see it
    val = holdout(y_tr, ds.val_per_class)
    rest = np.setdiff1d(np.arange(len(y_tr)), val, assume_unique=True)
    lut = np.arange(max(len(names), 1), dtype=np.int64)
    if ds.classes is not None:
        lut = np.full(max(len(names), 1), -1, np.int64)
        for i, c in enumerate(ds.classes):
            if c >= len(names):
                raise ConfigError(f"{key}.classes: class {c} not in 0..{len(names) - 1}")
            lut[c] = i
        names = [names[c] for c in ds.classes]
        keep_te = np.flatnonzero(lut[y_te] >= 0)
        x_te, y_te = x_te[keep_te], lut[y_te[keep_te]]
    val, rest = val[lut[y_tr[val]] >= 0], rest[lut[y_tr[rest]] >= 0]
    k = len(names)
    s = seed % 2**32
    i_tr = rest[_per_class_subset(lut[y_tr[rest]], ds.train_per_class, k, np.random.default_rng([s, 0]))]
    i_te = _per_class_subset(y_te, ds.test_per_class, k, np.random.default_rng([s, 1]))
    _check_split_sizes(ds, key, names, lut[y_tr[i_tr]], lut[y_tr[val]])
    size = ds.im_size or (16 if _parse_name(ds.name, key)[0] == "digits" else x_tr.shape[1])
    xs = [_domain(_resize(_to_float(x[i]), size), ds.domain) for x, i in ((x_tr, i_tr), (x_te, i_te), (x_tr, val))]
    var, mean = torch.var_mean(xs[0], dim=(0, 2, 3))
    std = var.sqrt().nan_to_num(1.0)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # a constant channel stays unscaled
    for x in xs:  # in place: these tensors are fresh, and CIFAR-size copies cost seconds
        x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    return ImageData(
        name=ds.name, x_train=xs[0], y_train=labels(lut[y_tr[i_tr]]), x_test=xs[1], y_test=labels(y_te[i_te]),
        classes=list(names), mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        x_val=xs[2], y_val=labels(lut[y_tr[val]]), train_ids=labels(i_tr), val_ids=labels(val),
    )


def _check_split_sizes(ds: DatasetConfig, key: str, names: list[str], y_train: np.ndarray, y_val: np.ndarray) -> None:
    """Every class keeps training images, and holds out the full ``val_per_class``."""
    k = len(names)
    counts, held = np.bincount(y_train, minlength=k), np.bincount(y_val, minlength=k)
    bad = np.flatnonzero((counts == 0) | (held < ds.val_per_class))
    if not k or not len(bad):
        return
    c = int(bad[0])
    total = int(counts[c] + held[c])
    if ds.val_per_class >= total:
        raise ConfigError(f"{key}.val_per_class: {ds.val_per_class} is not below class {names[c]!r}'s {total} "
                          "training images (some must stay to train on)")
    raise ConfigError(f"{key}.classes: class {names[c]!r} has no training images")
