"""Synthetic-set files: round trip, and crafted files that must not run code or crash the reader."""
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ptmdd_ray.artifacts import META_KEY, read_synthetic, write_synthetic
from ptmdd_ray.config import ConfigError


def test_round_trip(tmp_path):
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 0, 1, 1])
    write_synthetic(tmp_path / "s.parquet", images, labels, {"classes": ["a", "b"]})
    x, y, meta = read_synthetic(tmp_path / "s.parquet")
    assert torch.equal(x, images) and torch.equal(y, labels) and meta["classes"] == ["a", "b"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_parquet_crafted_to_unpickle_on_load_runs_nothing(tmp_path):
    """Arrow's legacy ``arrow.py_extension_type`` stored a pickle that pyarrow used to unpickle on
    read (CVE-2023-47248); a pickle as the column's extension type, and one as the file's
    metadata, are never executed."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    pixels = pa.field("pixels", pa.list_(pa.float32()), metadata={
        b"ARROW:extension:name": b"arrow.py_extension_type", b"ARROW:extension:metadata": payload})
    schema = pa.schema([pa.field("label", pa.int64()), pixels],
                       metadata={META_KEY: json.dumps({"shape": [1, 2, 2]}).encode()})
    table = pa.table({"label": pa.array([0], pa.int64()),
                      "pixels": pa.array([[0.0, 1.0, 2.0, 3.0]], pa.list_(pa.float32()))}, schema=schema)
    pq.write_table(table, tmp_path / "ext.parquet")
    try:
        read_synthetic(tmp_path / "ext.parquet")
    except ConfigError as e:
        assert "\n" not in str(e)
    assert not marker.exists()

    table = pa.table({"label": pa.array([0], pa.int64()), "pixels": pa.array([[0.0] * 4], pa.list_(pa.float32()))})
    pq.write_table(table.replace_schema_metadata({META_KEY: payload}), tmp_path / "meta.parquet")
    with pytest.raises(ConfigError, match="malformed content"):
        read_synthetic(tmp_path / "meta.parquet")
    assert not marker.exists()


@pytest.mark.parametrize("meta, pixels, match", [
    ({"shape": [1, 3, 3]}, [[0.0] * 4], "malformed content"),  # pixels do not fit the shape
    ({}, [[0.0] * 4], "malformed content"),  # no shape
    ({"shape": [1, 2, 2]}, [[0.0] * 8], "1 labels for 2 images"),
])
def test_inconsistent_files_are_one_line_errors(tmp_path, meta, pixels, match):
    labels = np.zeros(1, np.int64)
    table = pa.table({"label": labels, "pixels": pa.array(pixels, pa.list_(pa.float32()))})
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), tmp_path / "s.parquet")
    with pytest.raises(ConfigError, match=match) as e:
        read_synthetic(tmp_path / "s.parquet")
    assert "\n" not in str(e.value)
