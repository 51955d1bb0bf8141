"""End-to-end runs of the real `ptmdd` command line on real data (digits, CIFAR-10 Parquet)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from ptmdd_ray.config import Config, flatten

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.parquet"
FAST_DIGITS = ["--set", "model=ConvNetW32", "--set", "distill.ipc=1", "--set", "distill.iterations=100",
               "--set", "distill.batch_real=64", "--set", "eval.runs=3", "--set", "eval.epochs=100"]


def ptmdd(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", *args, "-q"], cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def cli(*args, cwd=ROOT):
    """The CLI as a user runs it, without ``-q`` (which ``--help`` and ``config`` do not take)."""
    return subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_every_subcommand_help_shows_defaults_and_an_example_with_shipped_files():
    top = cli("--help")
    assert top.returncode == 0 and "example:" in top.stdout
    commands = re.search(r"\{([a-z,]+)\}", top.stdout).group(1).split(",")
    assert {"distill", "pretrain", "evaluate", "study", "search", "report", "store", "config"} <= set(commands)
    for command in commands:
        proc = cli(command, "--help")
        assert proc.returncode == 0, (command, proc.stderr)
        text = proc.stdout
        assert "default" in text, command
        example = text.split("example:", 1)[1].strip().splitlines()[0]
        assert example.startswith(f"ptmdd {command} "), (command, example)
        for path in re.findall(r"studies/\S+\.yaml", example):
            assert (ROOT / path).is_file(), (command, path)


def test_config_lists_every_key_with_its_default_and_meaning():
    keys = flatten(Config())
    text = cli("config")
    assert text.returncode == 0, text.stderr
    rows = {}
    for line in text.stdout.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) == 3:
            rows[parts[0]] = parts[1:]
    for key, value in keys.items():
        shown, meaning = rows[key]
        assert shown == (value if isinstance(value, str) else json.dumps(value)), (key, shown)
        assert meaning.strip(), key
    listed = json.loads(cli("config", "--json").stdout)
    assert [r["key"] for r in listed] == list(keys)
    assert all(r["default"] == keys[r["key"]] and r["help"] and r["type"] for r in listed)


def test_config_method_shows_its_resolved_defaults():
    proc = cli("config", "--method", "dc")
    assert proc.returncode == 0, proc.stderr
    rows = {p[0]: p[1] for p in (re.split(r"\s{2,}", ln.strip()) for ln in proc.stdout.splitlines()) if len(p) == 3}
    assert rows["distill.lr_img"] == "0.1" and rows["distill.init"] == "noise" and rows["distill.method"] == "dc"
    assert rows["eval.augment"] == "false"


def test_unknown_sweep_key_points_to_ptmdd_config(tmp_path):
    study = {"name": "s", "base": {"distill": {"ipc": 1}}, "sweep": {"distill.nope": {"grid": [1]}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    proc = cli("study", "s.yaml", "--results", "r", cwd=tmp_path)
    assert proc.returncode == 2 and "sweep.distill.nope" in proc.stderr and "`ptmdd config`" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_distill_dm_ipc1_on_digits_beats_random_real_by_10_points(tmp_path):
    out = tmp_path / "run"
    proc = ptmdd("distill", *FAST_DIGITS, "--set", f"store={tmp_path / 'store'}", "--out", str(out), cwd=tmp_path)
    result = json.loads((out / "result.json").read_text())
    acc, base = result["accuracy"]["ConvNetW32"], result["baseline_random"]["ConvNetW32"]
    assert len(acc["runs"]) == 3 and all(0 <= a <= 1 for a in acc["runs"] + base["runs"])
    assert acc["mean"] >= base["mean"] + 0.10, (acc, base)
    assert result["config"]["distill"]["lr_img"] == 1.0  # resolved defaults are recorded
    t = result["timing"]
    assert t["iterations"] == 100 and t["seconds_per_iteration"] > 0 and t["eval_seconds"] > 0
    assert result["synthetic"] == "synthetic.parquet" and result["pool"] == []
    assert "ConvNetW32" in proc.stdout and "random real" in proc.stdout  # summary table

    table = pq.read_table(out / "synthetic.parquet")
    assert table.num_rows == 10 and sorted(table.column("label").to_pylist()) == list(range(10))
    meta = json.loads(table.schema.metadata[b"ptmdd"])
    assert meta["shape"] == [1, 16, 16] and len(meta["mean"]) == 1 and meta["config"]["distill"]["ipc"] == 1
    img = Image.open(out / "synthetic.png")
    assert img.size[1] > img.size[0]  # one row per class: 10 rows, 1 column

    # evaluate the saved set again with the config stored inside it
    ev = ptmdd("evaluate", str(out / "synthetic.parquet"), "--set", "eval.runs=2", "--set", "eval.epochs=100",
               "--out", str(tmp_path / "ev.json"), cwd=tmp_path)
    again = json.loads((tmp_path / "ev.json").read_text())
    assert abs(again["accuracy"]["ConvNetW32"]["mean"] - acc["mean"]) < 0.08
    assert again["baseline_random"]["ConvNetW32"]["mean"] < again["accuracy"]["ConvNetW32"]["mean"]
    assert "synthetic" in ev.stdout


@pytest.mark.slow
def test_distill_with_clom_pool_pretrains_once_then_reuses(tmp_path):
    store = tmp_path / "store"
    args = [*FAST_DIGITS, "--set", "distill.iterations=20", "--set", "eval.runs=1", "--set", "eval.epochs=20",
            "--set", "pool.archs=[ConvNetW32]", "--set", "pool.seeds=2", "--set", "pool.epoch=2",
            "--set", f"store={store}"]
    pre = ptmdd("pretrain", *args, cwd=tmp_path)
    assert "2 trained, 0 reused" in pre.stdout
    ptmdd("distill", *args, "--out", str(tmp_path / "a"), cwd=tmp_path)
    result = json.loads((tmp_path / "a" / "result.json").read_text())
    assert result["pool_stats"]["trainings"] == 0 and result["pool_stats"]["hits"] == 2
    assert [(p["arch"], p["seed"], p["epoch"]) for p in result["pool"]] == [("ConvNetW32", 0, 2), ("ConvNetW32", 1, 2)]
    assert all(p["test_accuracy"] > 0.5 for p in result["pool"])  # digits PTMs after 2 epochs
    assert result["config"]["loss"]["clom"] == 2000.0  # the DM default weight (the authors'), recorded


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.exists(), reason="real CIFAR-10 Parquet not present beside the repo")
def test_small_run_on_the_cifar10_parquet(tmp_path):
    out = tmp_path / "c"
    ptmdd("distill", "--set", f"dataset.name=parquet:{CIFAR}", "--set", "dataset.train_per_class=50",
          "--set", "dataset.test_per_class=50", "--set", "model=ConvNetW32", "--set", "distill.ipc=2",
          "--set", "distill.iterations=10", "--set", "distill.batch_real=32",
          "--set", "pool.archs=[ConvNetW32]", "--set", "pool.epoch=1", "--set", "loss.cclom=1.0",
          "--set", "eval.runs=1", "--set", "eval.epochs=10", "--set", f"store={tmp_path / 'store'}",
          "--out", str(out), cwd=tmp_path)
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["dataset"]["name"].startswith("parquet:")
    assert 0.0 <= result["accuracy"]["ConvNetW32"]["mean"] <= 1.0
    meta = json.loads(pq.read_table(out / "synthetic.parquet").schema.metadata[b"ptmdd"])
    assert meta["shape"] == [3, 32, 32] and meta["classes"][0] == "airplane"
    assert pq.read_table(out / "synthetic.parquet").num_rows == 20


def test_a_run_on_the_real_fashion_mnist_with_validation_domains_and_the_store(tmp_path):
    # Debian's Fashion-MNIST, read offline: a validation split, a PTM pool from its inverted domain
    # (CCLoM), a class subset; the second run reuses the stored PTMs
    args = ["--set", "dataset.name=fashionmnist", "--set", "dataset.train_per_class=30",
            "--set", "dataset.val_per_class=10", "--set", "dataset.test_per_class=20",
            "--set", "dataset.classes=[0,1,7,9]", "--set", "model=ConvNetW32", "--set", "distill.ipc=2",
            "--set", "distill.iterations=5", "--set", "distill.batch_real=16", "--set", "pool.archs=[ConvNetW32]",
            "--set", "pool.seeds=1", "--set", "pool.epoch=1", "--set", "pool.source={domain: invert}",
            "--set", "loss.clom=0", "--set", "loss.cclom=1.0", "--set", "eval.runs=1", "--set", "eval.epochs=5",
            "--set", f"store={tmp_path / 'store'}"]
    for run in ("a", "b"):
        ptmdd("distill", *args, "--out", str(tmp_path / run), cwd=tmp_path)
    first, second = (json.loads((tmp_path / r / "result.json").read_text()) for r in ("a", "b"))
    assert first["config"]["dataset"]["name"] == "fashionmnist" and first["config"]["pool"]["source"]["domain"] == "invert"
    assert set(first["val_accuracy"]) == {"ConvNetW32"} and 0.0 <= first["accuracy"]["ConvNetW32"]["mean"] <= 1.0
    assert first["pool_stats"]["trainings"] == 1 and second["pool_stats"]["trainings"] == 0
    meta = json.loads(pq.read_table(tmp_path / "a" / "synthetic.parquet").schema.metadata[b"ptmdd"])
    assert meta["shape"] == [1, 28, 28] and meta["classes"] == ["T-shirt/top", "Trouser", "Sneaker", "Ankle boot"]
