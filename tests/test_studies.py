"""Every shipped config validates (the CIFAR one only where its Parquet is present)."""
from pathlib import Path

import pytest

from ptmdd_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # paths in configs are relative to the repository root
    if "parquet:../shared" in path.read_text() and not (ROOT.parent / "shared/data/cifar10-jpeg.parquet").exists():
        pytest.skip("CIFAR-10 Parquet not beside the repository")
    cfg = load_config(path)
    assert cfg.distill.ipc >= 1 and cfg.eval.runs >= 3  # results are mean ± std over several runs


def test_the_main_job_uses_the_embedded_data():
    cfg = load_config(ROOT / "studies" / "digits.yaml")
    assert cfg.dataset.name == "digits" and cfg.pool.archs
