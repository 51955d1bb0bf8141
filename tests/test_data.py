"""Data loading: shapes, fixed splits, seeded subsets, domains, caching and config errors."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ptmdd_ray import data, sources
from ptmdd_ray.config import ConfigError, DatasetConfig
from ptmdd_ray.data import load_data

CIFAR_PARQUET = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg.parquet"


def digits(**kw) -> DatasetConfig:
    return DatasetConfig(name="digits", **kw)


# --------------------------------------------------------------------------- digits

def test_digits_default_shapes_and_split():
    d = data.load_data(digits())
    assert d.channels == 1 and d.im_size == 16 and d.num_classes == 10
    assert d.x_train.shape[1:] == (1, 16, 16) and d.x_train.dtype == torch.float32
    assert d.y_train.dtype == torch.int64
    assert len(d.x_train) + len(d.x_test) == 1797
    assert d.classes == [str(i) for i in range(10)]
    assert set(d.y_test.tolist()) == set(range(10))
    # normalised with train statistics
    assert abs(d.x_train.mean().item()) < 1e-4
    assert abs(d.x_train.std().item() - 1) < 1e-3
    # the split does not depend on the run seed
    d1 = data.load_data(digits(), seed=1)
    assert torch.equal(d.x_train, d1.x_train) and torch.equal(d.y_test, d1.y_test)


def test_digits_train_test_disjoint():
    x_tr, y_tr, x_te, y_te, names = sources.load_uint8(digits())
    assert x_tr.shape[1:] == (8, 8, 1) and x_tr.dtype == np.uint8 and x_tr.max() == 255
    assert len(x_tr) + len(x_te) == 1797
    from sklearn.datasets import load_digits
    raw = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    # every original image is in exactly one split (count by multiset of bytes)
    tr = {}
    for a in x_tr:
        tr[a.tobytes()] = tr.get(a.tobytes(), 0) + 1
    te = {}
    for a in x_te:
        te[a.tobytes()] = te.get(a.tobytes(), 0) + 1
    allc = {}
    for a in raw:
        allc[a.tobytes()] = allc.get(a.tobytes(), 0) + 1
    assert all(tr.get(k, 0) + te.get(k, 0) == v for k, v in allc.items())


@pytest.mark.parametrize("size", [8, 32])
def test_digits_im_size(size):
    d = data.load_data(digits(im_size=size))
    assert d.x_train.shape[1:] == (1, size, size) and d.x_test.shape[1:] == (1, size, size)


def test_train_per_class_is_seeded():
    a = data.load_data(digits(train_per_class=5, test_per_class=3), seed=0)
    assert torch.bincount(a.y_train).tolist() == [5] * 10
    assert torch.bincount(a.y_test).tolist() == [3] * 10
    assert [len(i) for i in a.class_indices()] == [5] * 10
    for c, idx in enumerate(a.class_indices()):
        assert (a.y_train[idx] == c).all()
    b = data.load_data(digits(train_per_class=5, test_per_class=3), seed=0)
    c = data.load_data(digits(train_per_class=5, test_per_class=3), seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_train, c.x_train)
    # larger than a class: take all
    big = data.load_data(digits(train_per_class=10_000))
    assert len(big.x_train) == len(data.load_data(digits()).x_train)


def test_class_subset_relabels():
    d = data.load_data(digits(classes=[5, 3]))
    assert d.classes == ["5", "3"] and d.num_classes == 2
    assert set(d.y_train.tolist()) == {0, 1}
    _, y_tr, _, _, _ = sources.load_uint8(digits())
    assert (d.y_train == 0).sum().item() == int((y_tr == 5).sum())
    with pytest.raises(ConfigError, match=r"^dataset\.classes"):
        data.load_data(digits(classes=[12]))


def test_domains():
    none = data.load_data(digits())
    inv = data.load_data(digits(domain="invert"))
    assert torch.allclose(inv.denormalize(inv.x_train), 1 - none.denormalize(none.x_train), atol=1e-5)
    gray = data.load_data(digits(domain="grayscale"))
    assert torch.allclose(gray.x_train, none.x_train)
    low = data.load_data(digits(domain="lowres"))
    assert low.x_train.shape == none.x_train.shape
    assert not torch.allclose(low.denormalize(low.x_train), none.denormalize(none.x_train), atol=1e-2)


def test_to_and_denormalize_range():
    d = data.load_data(digits(train_per_class=2)).to("cpu")
    px = d.denormalize(d.x_train)
    assert px.min() > -1e-4 and px.max() < 1 + 1e-4
    assert d.denormalize(d.x_train[0]).shape == d.x_train[0].shape


# --------------------------------------------------------------------------- parquet

def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(path: Path, *, with_label=True, corrupt_row=None) -> Path:
    rows = [(s, c) for c in range(3) for s in ["train"] * 4 + ["test"] * 2]
    blobs = [_png((60 * c + i, 10 * i, 255 - 60 * c)) for i, (_, c) in enumerate(rows)]
    if corrupt_row is not None:
        blobs[corrupt_row] = b"not an image"
    cols = {"split": [s for s, _ in rows], "png": pa.array(blobs, pa.binary())}
    if with_label:
        cols["label"] = pa.array([c for _, c in rows], pa.int8())
    table = pa.table(cols).replace_schema_metadata({b"classes": b"red,green,blue"})
    pq.write_table(table, path)
    return path


def test_parquet_loads_and_caches(tmp_path, monkeypatch):
    p = _write_parquet(tmp_path / "tiny.parquet")
    cache = tmp_path / "cache"
    ds = DatasetConfig(name=f"parquet:{p}", cache_dir=str(cache))
    d = data.load_data(ds)
    assert d.classes == ["red", "green", "blue"]
    assert d.x_train.shape == (12, 3, 8, 8) and d.x_test.shape == (6, 3, 8, 8)
    assert torch.bincount(d.y_train).tolist() == [4, 4, 4] and torch.bincount(d.y_test).tolist() == [2, 2, 2]
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    # second load, in a fresh process state, must come from the .npz without decoding
    sources._load_uint8_cached.cache_clear()

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(sources, "_decode_images", boom)
    d2 = data.load_data(ds)
    assert torch.equal(d.x_train, d2.x_train) and d2.classes == d.classes
    assert files[0].stat().st_mtime_ns == mtime and len(list(cache.glob("*.npz"))) == 1


def test_parquet_default_cache_next_to_file(tmp_path):
    p = _write_parquet(tmp_path / "tiny.parquet")
    sources.load_uint8(DatasetConfig(name=f"parquet:{p}"))
    assert len(list((tmp_path / ".ptmdd_cache").glob("*.npz"))) == 1


def test_parquet_read_only_dir_falls_back(tmp_path, monkeypatch):
    src = tmp_path / "ro"
    src.mkdir()
    p = _write_parquet(src / "tiny.parquet")
    home_cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home_cache))
    src.chmod(0o555)
    try:
        sources.load_uint8(DatasetConfig(name=f"parquet:{p}"))
    finally:
        src.chmod(0o755)
    assert not (src / ".ptmdd_cache").exists()
    assert len(list((home_cache / "ptmdd_ray").glob("*.npz"))) == 1


def test_parquet_missing_label(tmp_path):
    p = _write_parquet(tmp_path / "nolabel.parquet", with_label=False)
    with pytest.raises(ConfigError, match="'label'") as e:
        data.load_data(DatasetConfig(name=f"parquet:{p}", cache_dir=str(tmp_path / "c")))
    assert "\n" not in str(e.value)


def test_parquet_corrupt_bytes(tmp_path):
    p = _write_parquet(tmp_path / "bad.parquet", corrupt_row=7)
    with pytest.raises(ConfigError, match=r"^dataset\.name: .*row 7") as e:
        data.load_data(DatasetConfig(name=f"parquet:{p}", cache_dir=str(tmp_path / "c")))
    assert "bad.parquet" in str(e.value) and "\n" not in str(e.value)


def test_real_cifar10_parquet(tmp_path, monkeypatch):
    """The real CIFAR-10 Parquet, read from a read-only folder (set up here, whatever the machine's
    ../shared is): it loads, and nothing is written beside it; the decoded cache goes to the user's."""
    if not CIFAR_PARQUET.is_file():
        pytest.skip(f"{CIFAR_PARQUET} not present (offline CIFAR-10 fixture)")
    meta = pq.read_schema(CIFAR_PARQUET).metadata
    assert b"airplane" in meta[b"classes"]
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "cifar10.parquet").symlink_to(CIFAR_PARQUET)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ro.chmod(0o555)
    try:
        d = data.load_data(DatasetConfig(name=f"parquet:{ro / 'cifar10.parquet'}", train_per_class=10,
                                         test_per_class=10))
    finally:
        ro.chmod(0o755)
    assert d.x_train.shape == (100, 3, 32, 32) and d.x_test.shape == (100, 3, 32, 32)
    assert len(d.classes) == 10 and d.classes[0] == "airplane"
    assert torch.bincount(d.y_train).tolist() == [10] * 10
    assert not (ro / ".ptmdd_cache").exists()  # a read-only source is left alone
    assert len(list((tmp_path / "xdg" / "ptmdd_ray").glob("*.npz"))) == 1


# --------------------------------------------------------------------------- imagefolder

# --------------------------------------------------------------------------- Fashion-MNIST (IDX files)

def write_idx(path: Path, array: np.ndarray) -> Path:
    """``array`` (uint8) as an IDX file, gzipped when ``path`` ends in .gz (as Debian ships them)."""
    import gzip
    head = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(head + array.astype(np.uint8).tobytes())
    return path


def tiny_fashion(folder: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", np.arange(n) % 10)


def test_real_fashion_mnist_reads_debians_idx_files_offline():
    arrs = sources.load_uint8(DatasetConfig(name="fashionmnist"))
    assert [a.shape for a in arrs[:4]] == [(60000, 28, 28, 1), (60000,), (10000, 28, 28, 1), (10000,)]
    assert arrs[1][:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the data set's own first labels
    assert arrs[4][0] == "T-shirt/top" and arrs[4][9] == "Ankle boot"
    assert np.bincount(arrs[1]).tolist() == [6000] * 10 and np.bincount(arrs[3]).tolist() == [1000] * 10
    d = load_data(DatasetConfig(name="fashionmnist", train_per_class=20, val_per_class=10, test_per_class=5))
    assert d.x_train.shape == (200, 1, 28, 28) and d.x_test.shape == (50, 1, 28, 28) and d.has_val
    assert sources.source_id(DatasetConfig(name="fashionmnist")) != sources.source_id(DatasetConfig(name="mnist"))


@pytest.mark.parametrize("layout, gz", [("", True), ("FashionMNIST/raw", False)])
def test_fashion_mnist_reads_idx_files_from_root_first(tmp_path, layout, gz):
    tiny_fashion(tmp_path / layout if layout else tmp_path, gz)
    x_tr, y_tr, x_te, y_te, _ = sources.load_uint8(DatasetConfig(name="fashionmnist", root=str(tmp_path)))
    assert x_tr.shape == (40, 28, 28, 1) and x_te.shape == (20, 28, 28, 1) and y_te.tolist() == [*range(10)] * 2
    assert not list(tmp_path.rglob("*.npz"))  # read as they are: no cache beside them


def test_fashion_mnist_absent_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_DATASETS", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"^dataset.root: no fashionmnist IDX files in .* "
                                          r"\(install Debian's dataset-fashion-mnist: apt-get install"):
        sources.check_dataset_config(DatasetConfig(name="fashionmnist", root=str(tmp_path)), "dataset")


def test_a_broken_idx_file_is_named(tmp_path):
    tiny_fashion(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + np.asarray([20, 28, 28], ">u4").tobytes() + b"x")
    with pytest.raises(ConfigError, match=r"t10k-images-idx3-ubyte holds 1 bytes of data, its header says \(20, 28, 28\)"):
        sources.load_uint8(DatasetConfig(name="fashionmnist", root=str(tmp_path)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"PK\x03\x04")
    with pytest.raises(ConfigError, match="is not an unsigned-byte IDX file"):
        sources.read_idx(str(tmp_path / "t10k-images-idx3-ubyte"))


def test_imagefolder(tmp_path):
    root = tmp_path / "folder"
    colours = {"cat": (200, 0, 0), "ant": (0, 200, 0)}
    for split, n in (("train", 3), ("test", 2)):
        for name, rgb in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                size = (10, 10) if (split, name, i) == ("train", "cat", 2) else (12, 12)  # one odd size
                Image.new("RGB", size, rgb).save(root / split / name / f"{i}.png")
    d = data.load_data(DatasetConfig(name=f"imagefolder:{root}", cache_dir=str(tmp_path / "c")))
    assert d.classes == ["ant", "cat"]
    assert d.x_train.shape == (6, 3, 12, 12) and d.x_test.shape == (4, 3, 12, 12)
    red = d.denormalize(d.x_train)[:, 0].mean(dim=(1, 2))
    assert ((red > 0.5) == (d.y_train == 1)).all()


# --------------------------------------------------------------------------- config checks

@pytest.mark.parametrize(
    "kw, key",
    [
        ({"name": "foo"}, "dataset.name"),
        ({"name": "parquet:/nonexistent/x.parquet"}, "dataset.name"),
        ({"name": "imagefolder:/nonexistent/folder"}, "dataset.name"),
        ({"domain": "sepia"}, "dataset.domain"),
        ({"im_size": 4}, "dataset.im_size"),
        ({"train_per_class": 0}, "dataset.train_per_class"),
        ({"classes": [1, 1]}, "dataset.classes"),
        ({"classes": [-1]}, "dataset.classes"),
        ({"classes": [10]}, "dataset.classes"),
        ({"name": "cifar10", "root": "/nonexistent/root"}, "dataset.root"),
    ],
)
def test_check_dataset_config_errors(kw, key):
    with pytest.raises(ConfigError) as e:
        sources.check_dataset_config(DatasetConfig(**kw), "dataset")
    assert str(e.value).startswith(key + ":")
    assert "\n" not in str(e.value)


def test_check_dataset_config_ok(tmp_path):
    sources.check_dataset_config(digits(im_size=32, classes=[0, 9], domain="lowres"), "pool.source")
    p = _write_parquet(tmp_path / "ok.parquet")
    sources.check_dataset_config(DatasetConfig(name=f"parquet:{p}"), "dataset")
    assert sources.DOMAINS == ("none", "grayscale", "lowres", "invert")


def test_arrays_round_trip_without_copying_read_only_buffers():
    from ptmdd_ray.config import DatasetConfig
    from ptmdd_ray.data import ImageData, load_data

    data = load_data(DatasetConfig(name="digits"), 0)
    arrays = data.to_arrays()
    for k in ("x_train", "y_train", "x_test", "y_test"):
        arrays[k].setflags(write=False)  # as the Ray object store hands them out
    back = ImageData.from_arrays(arrays)
    assert back.classes == data.classes and back.mean == data.mean and back.num_classes == data.num_classes
    assert torch.equal(back.x_train, data.x_train) and torch.equal(back.y_test, data.y_test)
    assert back.x_train.data_ptr() == arrays["x_train"].ctypes.data  # a view, not a copy


# --------------------------------------------------------------------------- validation split

def _ids(t) -> set[int]:
    return set(t.tolist())


def test_the_validation_split_is_held_out_of_training_for_every_seed_and_subset():
    target = DatasetConfig(val_per_class=20)
    full = load_data(target, seed=0)
    assert full.y_val.bincount().tolist() == [20] * 10
    assert not _ids(full.train_ids) & _ids(full.val_ids)
    assert len(full.train_ids) + len(full.val_ids) == 1438  # the whole training split, nothing lost
    for seed, per_class in ((0, None), (7, None), (3, 50)):  # run seeds and per-class subsets
        d = load_data(DatasetConfig(val_per_class=20, train_per_class=per_class), seed=seed)
        assert torch.equal(d.val_ids, full.val_ids)  # (pixels are normalised by the training subset's stats)
        assert not _ids(d.train_ids) & _ids(full.val_ids)
    # a PTM source reading the same files with another label space or domain holds out the same
    # images, so PTMs pretrained there never see the target's validation images either
    for source in (DatasetConfig(val_per_class=20, classes=[5, 6, 7, 8, 9]), DatasetConfig(val_per_class=20,
                                                                                             domain="invert")):
        d = load_data(source, seed=0)
        assert _ids(d.val_ids) <= _ids(full.val_ids) and not _ids(d.train_ids) & _ids(full.val_ids)
    assert not load_data(DatasetConfig(), seed=0).has_val


def test_the_validation_split_is_seeded_apart_from_the_run():
    a, b = load_data(DatasetConfig(val_per_class=5), seed=0), load_data(DatasetConfig(val_per_class=6), seed=0)
    # n + 1 per class extends n per class: a larger hold-out still covers the smaller one
    assert _ids(a.val_ids) < _ids(b.val_ids)


@pytest.mark.parametrize("kw, needle", [
    ({"val_per_class": -1}, "dataset.val_per_class: must be >= 0"),
    ({"val_per_class": 200}, "dataset.val_per_class: 200 is not below class"),
])
def test_a_validation_split_that_does_not_fit_names_the_key(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        load_data(DatasetConfig(**kw))


def test_zca_whitening_follows_kornias_formula_fitted_on_training_images_only():
    """``dataset.zca`` (MTT's reference whitens CIFAR with kornia's ZCAWhitening, eps 0.1): the
    transform of an independent numpy SVD of the training covariance, applied to every split;
    what the test or validation images hold never changes it; whitened training images are
    decorrelated (their covariance is U diag(S / (S + eps)) U^T)."""
    plain = load_data(DatasetConfig(name="digits", val_per_class=5))
    white = load_data(DatasetConfig(name="digits", val_per_class=5, zca=True))
    x = plain.x_train.flatten(1).double().numpy()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / (x.shape[0] - 1)
    u, s, _ = np.linalg.svd(cov)
    t = u @ np.diag(1 / np.sqrt(s + data.ZCA_EPS)) @ u.T
    for split in ("x_train", "x_test", "x_val"):
        expected = (getattr(plain, split).flatten(1).double().numpy() - mean) @ t
        np.testing.assert_allclose(getattr(white, split).flatten(1).numpy(), expected, atol=2e-4)
    got = white.x_train.flatten(1).double().numpy()
    np.testing.assert_allclose(np.cov(got, rowvar=False), u @ np.diag(s / (s + data.ZCA_EPS)) @ u.T, atol=1e-3)
    train, other = plain.x_train.clone(), [plain.x_test.clone(), torch.zeros_like(plain.x_test)]
    firsts = []
    for extra in other:
        xs = [train.clone(), extra]
        data.zca_whiten(xs)
        firsts.append(xs[0])
    assert torch.equal(firsts[0], firsts[1])  # fitted on the training split alone
    no_val = load_data(DatasetConfig(name="digits", zca=True))  # an empty validation split (found by test_properties)
    assert no_val.x_val.shape[0] == 0 and not torch.equal(no_val.x_train, load_data(DatasetConfig(name="digits")).x_train)


def test_zca_leaves_stored_keys_at_its_default():
    """A field added after stores existed: off, it is not part of a PTM's or a baseline's identity."""
    from ptmdd_ray.config import PretrainConfig
    from ptmdd_ray.pool import PTMSpec

    assert "zca" not in PTMSpec("ConvNet", 0, DatasetConfig(), PretrainConfig()).identity()["source"]
    assert PTMSpec("ConvNet", 0, DatasetConfig(zca=True), PretrainConfig()).identity()["source"]["zca"] is True
    from ptmdd_ray.baseline import baseline_record
    from ptmdd_ray.config import build_config

    digits = load_data(DatasetConfig(name="digits", im_size=8))
    names = {}
    for zca in (False, True):
        name, ident = baseline_record(build_config({"dataset": {"name": "digits", "im_size": 8, "zca": zca}}), digits, 1)
        assert ("zca" in ident["dataset"]) == zca
        names[zca] = name
    assert names[False] != names[True]
