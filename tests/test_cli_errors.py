"""The real ``ptmdd`` CLI on bad input: status 2, exactly one ``ptmdd: error:`` line on stderr that
names the offending key, no traceback, and nothing written. Every call fails during validation,
before any training, so each returns within seconds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def ptmdd(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    line = lines[0]
    assert line.startswith("ptmdd: error: "), line
    assert needle in line, (needle, line)
    return line


def distill_fails(tmp_path: Path, needle: str, *args: str) -> str:
    out = tmp_path / "out"
    line = assert_one_line_error(ptmdd(tmp_path, "distill", *args, "--out", str(out)), needle)
    assert not out.exists(), "nothing may be written on bad input"
    return line


# --------------------------------------------------------------------------- distill

def test_unknown_key_in_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("distill:\n  ipc: 1\nfoo: 1\n")
    distill_fails(tmp_path, "foo", "c.yaml")


def test_unknown_nested_key_in_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("distill: {ipcc: 1}\n")
    distill_fails(tmp_path, "distill.ipcc", "c.yaml")


@pytest.mark.parametrize("override, key", [
    ("distill.ipc=0", "distill.ipc"),
    ("distill.method=xx", "distill.method"),
    ("model=Foo", "model"),
    ("loss.clom=-1", "loss.clom"),
    ("loss.clom=.nan", "loss.clom"),
    ("dataset.name=parquet:/does/not/exist.parquet", "dataset.name"),
    ("pool.archs=[ConvNet", "pool.archs"),
    ("noequals", "noequals"),
    ("distill.iterations=-1", "distill.iterations"),  # 0 is allowed: the initial set, undistilled
    ("eval.epochs=-3", "eval.epochs"),
    ("eval.runs=0", "eval.runs"),
    ("pretrain.epochs=0", "pretrain.epochs"),
    ("distill.ipc=two", "distill.ipc"),
    ("dataset.domain=sepia", "dataset.domain"),
    ("dataset.name=imagenet", "dataset.name"),
    ("dataset.name=imagefolder:/does/not/exist", "dataset.name"),
    ("pool.archs=[NoSuchNet]", "pool.archs"),
    ("loss.cclom=.inf", "loss.cclom"),
    ("eval.every=-1", "eval.every"),
])
def test_bad_override(tmp_path, override, key):
    distill_fails(tmp_path, key, "--set", override)


@pytest.mark.parametrize("sets, needle", [
    (["pool.source=fashionmnist", "loss.clom=1.0"], "loss.clom: the pool's label space (fashionmnist, classes all) "
                                                    "differs from the target's"),
    (["pool.source={name: fashionmnist, im_size: 20}", "loss.cclom=1.0"], "pool.source.im_size: 20px does not "
                                                                          "match the target's 16px"),
    (["pool.source=parquet:CIFAR", "loss.cclom=1.0"], "pool.source: parquet:"),
])
def test_a_pool_from_another_data_set_that_does_not_fit_is_one_line(tmp_path, sets, needle):
    """``pool.source`` from another data set (issue 25): CLoM across label spaces, another image size,
    another channel count: each one line naming the key, exit 2, nothing written."""
    cifar = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.parquet"
    if any("CIFAR" in s for s in sets) and not cifar.exists():
        pytest.skip("CIFAR-10 Parquet not beside the repository")
    args = [a for s in sets for a in ("--set", s.replace("CIFAR", str(cifar)))]
    line = distill_fails(tmp_path, needle, "--set", "pool.archs=[ConvNet]", *args)
    assert "channel" in line or "label space" in line or "im_size" in line


def test_malformed_yaml_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("distill:\n  ipc: [1,\n")
    line = distill_fails(tmp_path, "bad.yaml", "bad.yaml")
    assert line.startswith("ptmdd: error: config:")


def test_not_utf8_yaml_file(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    distill_fails(tmp_path, "bin.yaml", "bin.yaml")


def test_missing_config_file(tmp_path):
    distill_fails(tmp_path, "missing.yaml", "missing.yaml")


def test_fashion_mnist_without_its_files_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setitem(ENV, "PTMDD_DEBIAN_DATASETS", str(tmp_path / "no-datasets"))
    line = distill_fails(tmp_path, "dataset.root: no fashionmnist IDX files", "--set", "dataset.name=fashionmnist",
                         "--set", f"dataset.root={tmp_path}")
    assert "apt-get install dataset-fashion-mnist" in line


def test_ipc_larger_than_a_class(tmp_path):
    # digits has ~140 training images per class: detected after loading the data, before writing
    line = distill_fails(tmp_path, "distill.ipc", "--set", "distill.ipc=500")
    assert "500" in line


# --------------------------------------------------------------------------- argparse

def test_no_subcommand(tmp_path):
    assert_one_line_error(ptmdd(tmp_path), "command")


def test_distill_without_out(tmp_path):
    assert_one_line_error(ptmdd(tmp_path, "distill"), "--out")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- evaluate

def test_evaluate_missing_file(tmp_path):
    out = tmp_path / "eval.json"
    assert_one_line_error(ptmdd(tmp_path, "evaluate", "/nonexistent.parquet", "--out", str(out)),
                          "/nonexistent.parquet")
    assert not out.exists()


def test_evaluate_foreign_parquet(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}), path)
    out = tmp_path / "eval.json"
    line = assert_one_line_error(ptmdd(tmp_path, "evaluate", str(path), "--out", str(out)), "other.parquet")
    assert "synthetic" in line
    assert not out.exists()


def test_evaluate_not_parquet(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not a parquet file at all")
    assert_one_line_error(ptmdd(tmp_path, "evaluate", str(path)), "junk.parquet")


PRETRAIN = ["pretrain", "--set", "dataset.name=digits", "--set", "dataset.im_size=8", "--set", "pool.archs=[ConvNetW32]",
            "--set", "pool.seeds=1", "--set", "pool.epoch=1"]


def _store_files(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "ptm").iterdir()) if (store / "ptm").exists() else []


def test_a_read_only_store_is_named_before_any_training(tmp_path):
    (tmp_path / "ro").write_text("a file where the store directory should be")  # fails for root too
    proc = ptmdd(tmp_path, *PRETRAIN, "--set", f"store={tmp_path / 'ro'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ptmdd: error:")]
    assert len(lines) == 1 and f"store: {tmp_path / 'ro'} is not writable" in lines[0]
    assert "training PTM" not in proc.stderr


def test_disk_full_mid_checkpoint_leaves_nothing_half_written(tmp_path):
    """The file-size limit makes the checkpoint's write fail part-way, as a full disk does: one
    error line naming the file, exit 1, and no checkpoint or temporary file left in the store."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", *PRETRAIN, "--set", f"store={store}"], cwd=tmp_path,
                          env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ptmdd: error:")]
    assert len(lines) == 1 and "store: cannot write" in lines[0] and ".safetensors" in lines[0]
    assert _store_files(store) == []
    assert ptmdd(tmp_path, *PRETRAIN, "--set", f"store={store}").returncode == 0  # space back: it trains
    assert len(_store_files(store)) == 2


STUDY = {"name": "s", "base": {"dataset": {"name": "digits"}, "distill": {"ipc": 1, "iterations": 2},
                                "pool": {"archs": ["ConvNetW32"]}},
         "sweep": {"loss.clom": {"grid": [0.0, 1.0]}}}


@pytest.mark.parametrize("edit, needle", [
    ({"resources": {"cpu": -1}}, "resources"),
    ({"resources": {"gpu": -0.5}}, "resources"),
    ({"samples": 0}, "samples"),
    ({"max_concurrent": 0}, "max_concurrent"),
    ({"sweep": {"distill.nope": {"grid": [1]}}}, "sweep.distill.nope"),
    ({"sweep": {"distill.ipc": {"grid": [1, -1]}}}, "distill.ipc"),
    ({"search": {"loss.clom": {"uniform": [2.0, 1.0]}}}, "search.loss.clom"),
    ({"search": {"loss.clom": {"loguniform": [0.0, 1.0]}}}, "search.loss.clom"),
    ({"mode": "maximize"}, "mode"),
    ({"metric": "val.acc.mean"}, "metric: val.acc.mean is a validation metric but dataset.val_per_class is 0"),
    ({"claims": [{"claim": "c", "better": {"loss.clom": "best"}, "than": "random"}]}, "not a validation metric"),
    ({"metric": "val.acc.mean", "base": {**STUDY["base"], "dataset": {"name": "digits", "val_per_class": 5}},
      "claims": [{"claim": "c", "better": {"distill.ipc": "best"}, "than": "random"}]}, "distill.ipc is not swept"),
    ({"matrix": "distill.ipc"}, "matrix"),
    ({"unknown": 1}, "unknown"),
    ({"base": {"distill": {"ipcc": 1}}}, "distill.ipcc"),
    ({"second_objective": "cost.seconds"}, "second_objective: needs a search space"),
    ({"search": {"loss.clom": {"uniform": [0.0, 1.0]}}, "second_objective": "cost.secs"},
     "second_objective: 'cost.secs' is not a metric every trial reports"),
    ({"search": {"loss.clom": {"uniform": [0.0, 1.0]}}, "second_objective": "cost.distill.gpu_s"},
     "second_objective: cost.distill.gpu_s is a GPU figure and the trials ask for no GPU"),
])
def test_bad_study_file(tmp_path, edit, needle):
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**STUDY, **edit}))
    results = tmp_path / "results"
    assert_one_line_error(ptmdd(tmp_path, "study", "s.yaml", "--results", str(results)), needle)
    assert not results.exists()


def test_search_without_a_space_and_prune_without_evaluations(tmp_path):
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(STUDY))
    assert_one_line_error(ptmdd(tmp_path, "search", "s.yaml", "--trials", "2", "--results", "r"), "search")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**STUDY, "search": {"loss.clom": {"uniform": [0.0, 1.0]}}}))
    assert_one_line_error(ptmdd(tmp_path, "search", "s.yaml", "--trials", "2", "--prune", "--results", "r"),
                          "prune")
    assert not (tmp_path / "r").exists()


def test_a_second_objective_refuses_pruning_and_an_optuna_study_with_other_directions(tmp_path):
    import optuna
    import yaml

    space = {"loss.clom": {"uniform": [0.0, 1.0]}}
    base = {**STUDY["base"], "dataset": {"name": "digits", "val_per_class": 5}, "eval": {"every": 1}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**STUDY, "base": base, "search": space,
                                                     "second_objective": "cost.seconds"}))
    assert_one_line_error(ptmdd(tmp_path, "search", "s.yaml", "--trials", "2", "--prune", "--results", "r"),
                          "prune: a search with a second_objective is multi-objective")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=storage, direction="maximize")  # begun with one objective
    assert_one_line_error(ptmdd(tmp_path, "search", "s.yaml", "--trials", "2", "--optuna-storage", storage,
                                "--results", "r"), "second_objective: the Optuna study 's' in the storage optimises")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("val, needle", [(500, "dataset.val_per_class: 500 is not below class"),
                                         (138, "dataset.val_per_class: 138 held out")])
def test_a_validation_split_that_does_not_fit_fails_before_anything_runs(tmp_path, val, needle):
    import yaml

    distill_fails(tmp_path, needle, "--set", f"dataset.val_per_class={val}", "--set", "distill.ipc=2")
    base = {**STUDY["base"], "dataset": {"name": "digits", "val_per_class": val}, "distill": {"ipc": 2}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**STUDY, "base": base, "metric": "val.acc.mean"}))
    results = tmp_path / "results"
    assert_one_line_error(ptmdd(tmp_path, "study", "s.yaml", "--results", str(results)), needle)
    assert not results.exists()


def test_a_search_refuses_to_choose_on_test_accuracy(tmp_path):
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**STUDY, "search": {"loss.clom": {"uniform": [0.0, 1.0]}}}))
    line = assert_one_line_error(ptmdd(tmp_path, "search", "s.yaml", "--trials", "2", "--results", "r"),
                                 "metric: acc.mean is test accuracy")
    assert "val.acc.mean" in line and "--select-on-test" in line
    assert not (tmp_path / "r").exists()


def test_a_study_on_an_address_with_no_cluster_fails_before_anything(tmp_path):
    from helpers import free_port

    study = Path(__file__).resolve().parents[1] / "studies" / "quickstart.yaml"
    port = free_port()
    proc = ptmdd(tmp_path, "study", str(study), "--address", f"127.0.0.1:{port}", "--results",
                 str(tmp_path / "results"), "--store", str(tmp_path / "store"))
    assert_one_line_error(proc, f"address: no Ray cluster at 127.0.0.1:{port}")
    assert not (tmp_path / "results").exists() and not (tmp_path / "store").exists()


@pytest.mark.parametrize("fault, needle", [("bucket", "does not exist"), ("endpoint", "cannot reach"),
                                           ("credentials", "access denied")])
def test_a_study_on_a_bad_s3_store_fails_before_anything(tmp_path, s3, fault, needle):
    """An S3 store that cannot be used is named in one line before Ray starts; nothing is written."""
    from helpers import free_port

    env = dict(s3.env)
    store = s3.uri
    if fault == "bucket":
        store = "s3://no-such-bucket/ptm"
    elif fault == "endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    else:
        env["AWS_SECRET_ACCESS_KEY"] = "wrong"
    study = Path(__file__).resolve().parents[1] / "studies" / "quickstart.yaml"
    proc = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "study", str(study), "--store", store,
                           "--results", str(tmp_path / "results")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptmdd: error: store: ") and needle in lines[0], proc.stderr
    assert not (tmp_path / "results").exists()
    assert "raylet" not in subprocess.run(["pgrep", "-af", str(tmp_path)], capture_output=True, text=True).stdout


def test_results_in_a_bucket_need_servers_for_mlflow_and_optuna(tmp_path):
    study = Path(__file__).resolve().parents[1] / "studies" / "loss_weights.yaml"
    assert_one_line_error(ptmdd(tmp_path, "study", str(study), "--results", "s3://bucket/studies"),
                          "results: s3://bucket/studies is not a local directory")
    assert_one_line_error(ptmdd(tmp_path, "search", str(study), "--trials", "1", "--results", "s3://bucket/studies",
                                "--mlflow-uri", "sqlite:///" + str(tmp_path / "m.db")),
                          "optuna-storage: --results s3://bucket/studies is not a local directory")
    assert_one_line_error(ptmdd(tmp_path, "study", str(study), "--results",
                                "s3://bucket/studies?endpoint_override=127.0.0.1:9&access_key=k&secret_key=s"),
                          "results: s3://bucket/studies?...: URI options are not supported here")
    assert not list(tmp_path.iterdir())


MTT = ("model: ConvNetW32\ndistill: {method: mtt, ipc: 1}\npool: {archs: [ConvNetW32]}\n"
       "pretrain: {epochs: 50, momentum: 0.0, weight_decay: 0.0, schedule: constant}\n")


@pytest.mark.parametrize("override, needle", [
    ("distill.syn_steps=0", "distill.syn_steps: must be >= 1"),
    ("distill.expert_epochs=0", "distill.expert_epochs: must be >= 1"),
    ("distill.lr_lr=-1", "distill.lr_lr"),
    ("distill.max_start_epoch=50", "distill.max_start_epoch: segments reach epoch 51"),
    ("distill.expert_epochs=60", "distill.expert_epochs: segments reach epoch 61"),
    ("pool.archs=[ConvNet]", "pool.archs: MTT needs expert trajectories of the student's architecture: add "
                             "ConvNetW32"),
    ("pool.archs=[]", "pool.archs: MTT needs expert trajectories"),
    ("distill.compile=true", "distill.compile: MTT has no compiled path"),
    ("pretrain.schedule=cosine", "pretrain.schedule"),
    ("pretrain.dsa_strategy=blur", "pretrain.dsa_strategy"),
    ("distill.syn_steps=100000000", "distill.syn_steps: MTT's 100000000 unrolled steps of 10 images and its experts' "
                                    "trajectories need ~"),
    ("distill.mtt_gradient=tesla", "distill.mtt_gradient: expected one of unrolled, recomputed, got 'tesla'"),
])
def test_bad_mtt_settings_fail_before_anything_runs(tmp_path, override, needle):
    """MTT's own settings (issue 26): a step count below 1, segments beyond what the experts' runs
    keep (named by the setting that pushes them there), no expert of the student's architecture, no
    experts at all, a compiled run (MTT has none), unrolled steps that cannot fit in memory (refused
    after loading the data, before any expert trains)."""
    (tmp_path / "mtt.yaml").write_text(MTT)
    distill_fails(tmp_path, needle, "mtt.yaml", "--set", override)
