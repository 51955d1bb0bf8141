"""Image data as tensors: one loader for every source, returning normalised CPU tensors.

:mod:`ptmdd_ray.sources` checks a data set and reads it into uint8 numpy arrays (cached);
:func:`load_data` then holds out the validation split and applies class subsetting, seeded
per-class subsets, resizing, the domain transform and normalisation as vectorised tensor ops.
Problems with the user's data surface as :class:`ConfigError` naming the config key.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError, DatasetConfig
from .sources import load_uint8, parse_name

__all__ = ["ImageData", "load_data"]


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


ZCA_EPS = 0.1  # the reference's kornia.enhance.ZCAWhitening(eps=0.1)


def zca_whiten(xs: list[torch.Tensor], eps: float = ZCA_EPS, chunk: int = 4096) -> None:
    """ZCA whitening as MTT's reference applies it (kornia's ``ZCAWhitening``: the unbiased
    covariance of the flattened images, ``T = U diag(1 / sqrt(S + eps)) U^T``), fitted on
    ``xs[0]``, the training split (validation and test never shape it), applied in place to
    every split, in chunks (a CIFAR-10 split is 600 MB)."""
    train = xs[0].flatten(1)
    mean = train.mean(0, dtype=torch.float64)
    cov = torch.zeros(train.shape[1], train.shape[1], dtype=torch.float64)
    for start in range(0, train.shape[0], chunk):
        part = train[start:start + chunk].double() - mean
        cov += part.T @ part
    evals, evecs = torch.linalg.eigh(cov / max(1, train.shape[0] - 1))
    transform = ((evecs * (evals.clamp_min(0) + eps).rsqrt()) @ evecs.T).float()
    mean = mean.float()
    for x in xs:
        flat = x.view(x.shape[0], -1 if x.shape[0] else mean.numel())  # an empty split (no validation) too
        for start in range(0, flat.shape[0], chunk):
            flat[start:start + chunk] = (flat[start:start + chunk] - mean) @ transform


def load_data(ds: DatasetConfig, seed: int = 0, *, key: str = "dataset") -> ImageData:
    """Load, subset, resize, transform and normalise. ``seed`` only picks the per-class subsets; the
    train/test split itself never depends on it."""
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
    size = ds.im_size or (16 if parse_name(ds.name, key)[0] == "digits" else x_tr.shape[1])
    xs = [_domain(_resize(_to_float(x[i]), size), ds.domain) for x, i in ((x_tr, i_tr), (x_te, i_te), (x_tr, val))]
    var, mean = torch.var_mean(xs[0], dim=(0, 2, 3))
    std = var.sqrt().nan_to_num(1.0)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # a constant channel stays unscaled
    for x in xs:  # in place: these tensors are fresh, and CIFAR-size copies cost seconds
        x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    if ds.zca:
        zca_whiten(xs)

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
