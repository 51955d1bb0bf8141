"""Image sources without torch: which data sets exist, whether a config's one can be read, and
reading it into uint8 numpy arrays.

Sources are sklearn's bundled ``digits`` (offline, used by tests and smoke runs), torchvision data sets,
Fashion-MNIST's original IDX files (Debian's ``dataset-fashion-mnist`` package, read offline), a Parquet table of encoded images (``parquet:PATH``) and an ImageFolder tree (``imagefolder:PATH``).
:func:`check_dataset_config` validates a :class:`~ptmdd_ray.config.DatasetConfig` without decoding
anything, so the config rejects a bad one before any work is queued. Decoding is the slow part, so
:func:`load_uint8` decodes once into a ``.npz`` cache (no pickle) and an in-process LRU cache.
Problems with the user's data surface as :class:`ConfigError` naming the config key, never as a
stack trace from Pillow. Nothing here imports torch at import time (only reading a torchvision
data set does, through torchvision), so :mod:`ptmdd_ray.config` can check data sets while staying light.
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:  # annotations only: config imports this module to check its data sets
    from .config import DatasetConfig

logger = logging.getLogger(__name__)

# name -> (torchvision class, path under root whose presence means "already downloaded")
TORCHVISION = {
    "cifar10": ("CIFAR10", ("cifar-10-batches-py",)),
    "cifar100": ("CIFAR100", ("cifar-100-python",)),
    "mnist": ("MNIST", ("MNIST/raw",)),
    "fashionmnist": ("FashionMNIST", ("FashionMNIST/raw",)),
    "svhn": ("SVHN", ("train_32x32.mat", "test_32x32.mat")),
}
# name -> (Debian package, its folder under DEBIAN_DATASETS, the IDX files' stems: train and test
# images and labels): data sets read from their original IDX files, no network and no torchvision
IDX = {
    "fashionmnist": ("dataset-fashion-mnist", "fashion-mnist",
                     ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                      "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
}
IDX_CLASSES = {"fashionmnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                "Sneaker", "Bag", "Ankle boot"]}  # torchvision's names, in label order
DEBIAN_DATASETS = os.environ.get("PTMDD_DEBIAN_DATASETS", "/usr/share/datasets")  # where Debian installs them
DOMAINS = ("none", "grayscale", "lowres", "invert")  # derived domains, see data._domain
# (channels, side) of the images a built-in name gives at its native size (digits: upsampled from 8)
NATIVE_SHAPE = {"digits": (1, 16), "cifar10": (3, 32), "cifar100": (3, 32), "mnist": (1, 28), "fashionmnist": (1, 28),
                "svhn": (3, 32)}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "mnist": 10, "fashionmnist": 10, "svhn": 10}
KNOWN = ", ".join([*NUM_CLASSES, "parquet:PATH", "imagefolder:PATH"])
IMAGE_COLUMNS = ("jpeg", "png", "image", "bytes")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "F"}
CACHE_VERSION = 1  # bump when the cached array layout changes
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]


def _file_source(name: str) -> tuple[str, str] | None:
    """``(kind, path as written)`` of a ``parquet:PATH`` or ``imagefolder:PATH`` name, else None."""
    for kind in ("parquet", "imagefolder"):
        if name.startswith(kind + ":"):
            return kind, name[len(kind) + 1:].strip()
    return None


def parse_name(name: str, key: str) -> tuple[str, str | None]:
    """``(kind, absolute path or None)``; kind is a built-in name, ``parquet`` or ``imagefolder``."""
    if name.lower() in NUM_CLASSES:
        return name.lower(), None
    source = _file_source(name)
    if source is None:
        raise ConfigError(f"{key}.name: unknown dataset {name!r} (known: {KNOWN})")
    kind, path = source
    if not path:
        raise ConfigError(f"{key}.name: {kind}: needs a path ({kind}:PATH)")
    return kind, os.path.abspath(os.path.expanduser(path))


def canonical_name(name: str) -> str:
    """``name`` as part of an identity (a PTM's key, a cached baseline's): a file source with its
    absolute, normalised path, so that ``parquet:../shared/x.parquet`` anchored in /work/a and
    ``parquet:/work/shared/x.parquet`` are one source; built-in names as given."""
    source = _file_source(name)
    if source is None or not source[1]:
        return name
    kind, path = source
    return f"{kind}:{os.path.abspath(os.path.expanduser(path))}"


def _parquet_schema(path: str, key: str):
    import pyarrow.parquet as pq
    try:
        return pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is the user's file
        raise ConfigError(f"{key}.name: cannot read parquet file {path} ({type(e).__name__})") from None


def check_dataset_config(ds: DatasetConfig, key: str) -> None:
    """Validate ``ds`` without decoding images, so a bad config fails before any work is queued."""
    kind, path = parse_name(ds.name, key)
    if kind == "parquet":
        if not os.path.isfile(path):
            raise ConfigError(f"{key}.name: parquet file not found: {path}")
        _parquet_schema(path, key)
    elif kind == "imagefolder":
        for split in ("train", "test"):
            if not os.path.isdir(os.path.join(path, split)):
                raise ConfigError(f"{key}.name: image folder {path} has no '{split}' subfolder")
    elif kind in IDX and not ds.download and idx_dir(kind, ds.root) is None:
        package, folder, _ = IDX[kind]
        raise ConfigError(f"{key}.root: no {kind} IDX files in {os.path.expanduser(ds.root)} or "
                          f"{os.path.join(DEBIAN_DATASETS, folder)} (install Debian's {package}: "
                          f"apt-get install {package}; or set {key}.root to a folder holding them)")
    elif kind in TORCHVISION and kind not in IDX and not ds.download:
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


def idx_dir(kind: str, root: str) -> str | None:
    """The first folder holding all of ``kind``'s IDX files (each plain or gzipped): ``root``
    itself, torchvision's layout under it (``FashionMNIST/raw``), then Debian's folder; None if
    none does."""
    root = os.path.abspath(os.path.expanduser(root))
    places = (root, os.path.join(root, *TORCHVISION[kind][1][0].split("/")), os.path.join(DEBIAN_DATASETS, IDX[kind][1]))
    return next((d for d in places if _holds_idx(kind, d)), None)


def _holds_idx(kind: str, folder: str) -> bool:
    """Whether ``folder`` holds every one of ``kind``'s IDX files."""
    return all(_idx_file(folder, stem) for stem in IDX[kind][2])


def _idx_file(folder: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def read_idx(path: str) -> np.ndarray:
    """One IDX file (LeCun's format, plain or gzipped) as a uint8 array: a big-endian header of
    two zero bytes, the type (0x08: unsigned byte) and the number of dimensions, then one 32-bit
    size per dimension, then the data. Anything else is a ConfigError naming the file."""
    import gzip
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise ConfigError(f"dataset.root: {path} is not an unsigned-byte IDX file")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", raw[3], 4))
    body = 4 + 4 * len(shape)
    if len(raw) - body != int(np.prod(shape)):
        raise ConfigError(f"dataset.root: {path} holds {len(raw) - body} bytes of data, its header says {shape}")
    return np.frombuffer(raw, np.uint8, offset=body).reshape(shape)


def _read_idx(kind: str, folder: str) -> Arrays:
    x_tr, y_tr, x_te, y_te = (read_idx(_idx_file(folder, stem)) for stem in IDX[kind][2])
    for x, y, split in ((x_tr, y_tr, "train"), (x_te, y_te, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ConfigError(f"dataset.root: {folder}: {split} images {x.shape} and labels {y.shape} do not match")
    return (np.ascontiguousarray(x_tr[..., None]), y_tr.astype(np.int64),
            np.ascontiguousarray(x_te[..., None]), y_te.astype(np.int64), list(IDX_CLASSES[kind]))


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
    if kind in IDX and _holds_idx(kind, src):
        paths = [_idx_file(src, stem) for stem in IDX[kind][2]]
    else:
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
    elif kind in IDX and _holds_idx(kind, src):  # as fast to read as a cache, so none is written
        arrs = _read_idx(kind, src)
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
    kind, path = parse_name(ds.name, key)
    if path is None and kind != "digits":
        path = os.path.abspath(os.path.expanduser(ds.root))
        if kind in IDX:
            path = idx_dir(kind, ds.root) or path  # else torchvision downloads into root
    return kind, path


def load_uint8(ds: DatasetConfig, *, key: str = "dataset") -> Arrays:
    """Raw ``(x_train, y_train, x_test, y_test, class_names)``: x uint8 (N, H, W, C), y int64, before any
    subset, resize or domain. Arrays are read-only (shared through an in-process cache). ``ds`` is
    checked first (:func:`check_dataset_config`), so a bad one fails with its key before any decoding."""
    check_dataset_config(ds, key)
    kind, src = _source(ds, key)
    sig = () if kind == "digits" else _signature(kind, src)
    return _load_uint8_cached(kind, src, sig, bool(ds.download), ds.cache_dir)


def image_shape(ds: DatasetConfig, key: str = "dataset") -> tuple[int, int]:
    """(channels, side) of the images a run on ``ds`` sees: ``im_size`` if set, else the set's
    own (a built-in's from :data:`NATIVE_SHAPE`; a file source is decoded once, into its cache)."""
    kind, _ = parse_name(ds.name, key)
    if kind in NATIVE_SHAPE:
        channels, side = NATIVE_SHAPE[kind]
    else:
        x = load_uint8(ds, key=key)[0]
        channels, side = x.shape[3], x.shape[1]
    return channels, ds.im_size or side


def source_id(ds: DatasetConfig, *, key: str = "dataset") -> str:
    """A short digest of what ``ds`` reads: its kind, absolute location and the size and mtime of
    its files. Results computed from the data (a cached baseline) are keyed on it, so that a
    relative path read from another directory, or a rewritten file, is a different source."""
    kind, src = _source(ds, key)
    if src is None:
        return kind
    return hashlib.sha256(repr((kind, src, _signature(kind, src))).encode()).hexdigest()[:20]
