"""The reproduction studies (bench/repro/studies/*.yaml) state their design before they run, and
bench/reproduce.sh runs one end to end: study, rows file, report from the rows."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import session_pids, stop_session
from ptmdd_ray.study_spec import load_study

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "bench" / "repro" / "studies").glob("*.yaml"))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.parquet"


def header(path: Path) -> str:
    """The file's leading comment block, without the '#'s."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines)


def test_there_are_reproduction_studies():
    names = {p.stem for p in STUDIES}
    assert {"epochs", "diversity", "domain", "disjoint", "cross_arch", "dc_dsa_cifar10", "dc_dsa_digits"} <= names


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_reproduction_study_states_its_design(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the data paths are relative to the repository root (../shared beside it)
    text = path.read_text()
    if "parquet:../shared" in text and not CIFAR.exists():
        pytest.skip("CIFAR-10 Parquet not beside the repository")
    study = load_study(path)  # every grid point and claim validates
    spec = study.spec
    assert spec.name == path.stem  # `ptmdd rows NAME` and reproduce.sh find the study by its file's name
    assert yaml.safe_load(text)["samples"] >= 5 and spec.samples >= 5  # fixed in the file, not by an override
    assert spec.metric == "val.acc.mean" and spec.mode == "max"
    assert spec.claims, "a reproduction study states its claims"
    assert all(c.claim for c in spec.claims)
    head = header(path)
    assert f"ptmdd study bench/repro/studies/{path.name}" in head  # how to run it
    assert f"ptmdd rows {spec.name} " in head  # and export its rows
    stated = re.search(r"\b(\d+) trials\b", head)
    if stated:  # a header that gives the trial count gives the one the file runs
        assert int(stated.group(1)) == len(study.grid) * spec.samples, stated.group(0)
    cfgs = [study.trial_config(point, 0) for point in study.grid]
    for cfg in cfgs:
        assert cfg.eval.runs >= 3  # mean ± std over several evaluation models
        if cfg.dataset.name.startswith("parquet:"):  # CIFAR-10: a validation split of 200 per class
            assert cfg.dataset.val_per_class == 200


def test_reproduce_sh_parses_and_refuses_an_unknown_study(tmp_path):
    script = ROOT / "bench" / "reproduce.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), "no_such_study"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "ROWS": str(tmp_path / "rows"),
                               "PTMDD": "false"})
    assert proc.returncode == 2 and "no study no_such_study" in proc.stderr
    assert "dc_dsa_digits" in proc.stderr  # it lists the studies there
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_reproduce_sh_runs_a_study_to_its_rows_and_report(tmp_path):
    """`bash bench/reproduce.sh dc_dsa_digits` shrunk to seconds: the study on a local Ray, its rows
    file, the report read from it; nothing of the run left behind."""
    out, rows = tmp_path / "out", tmp_path / "rows"
    sets = ("--set samples=2 --set base.distill.iterations=2 --set base.distill.batch_real=16 "
            "--set base.dataset.im_size=8 --set base.pool.seeds=1 --set base.pool.epoch=2 "
            "--set base.pretrain.epochs=2 --set base.eval.runs=1 --set base.eval.epochs=2")
    env = {**os.environ, "OUT": str(out), "ROWS": str(rows), "SETS": sets,
           "PTMDD": f"{sys.executable} -m ptmdd_ray.cli",
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.Popen(["bash", str(ROOT / "bench" / "reproduce.sh"), "dc_dsa_digits"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, (stdout[-3000:], stderr[-3000:])
        end = time.time() + 60  # the CLI stops its local Ray; give its daemons a moment to exit
        while session_pids(proc.pid) and time.time() < end:
            time.sleep(1)
        assert not session_pids(proc.pid), "processes of the run were left running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_session(proc.pid, grace=5)
    assert "study dc_dsa_digits: 8 trials, 0 failed" in stdout
    import pyarrow.parquet as pq

    table = pq.read_table(rows / "dc_dsa_digits.parquet")
    assert table.num_rows == 8 and set(table.column("sample").to_pylist()) == {0, 1}
    md = (out / "report" / "dc_dsa_digits" / "report.md").read_text()
    assert "## Findings" in md and "| claim | better | than |" in md
    assert md.count("DC + CLoM beats DC") == 1 and "DSA beats random real images" in md
