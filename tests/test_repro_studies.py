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
        assert cfg.dataset.val_per_class > 0  # every choice reads a validation split, on every data set
        if cfg.dataset.name.startswith("parquet:"):  # CIFAR-10: a validation split of 200 per class
            assert cfg.dataset.val_per_class == 200


def test_a_point_at_the_default_weight_reads_back_through_rows_and_report(tmp_path):
    """domain and cross_arch name CLoM at the method's default weight as `loss.clom: null` (so a
    claim can select that point): the rows file and the report read it, as `default`."""
    import json

    from ptmdd_ray.report import write_report
    from ptmdd_ray.rows import StudyRun, write_rows

    claims = [{"claim": "CLoM beats plain DM", "better": {"loss.clom": None}, "than": "control"}]
    run = StudyRun("p0", {"ptmdd.study": "cross_arch", "ptmdd.kind": "study", "ptmdd.swept": "loss.clom",
                          "ptmdd.matrix": "", "ptmdd.control": json.dumps({"loss.clom": 0.0}),
                          "ptmdd.control_added": "false", "ptmdd.cases": "[]", "ptmdd.claims": json.dumps(claims),
                          "ptmdd.metric": "val.acc.mean", "ptmdd.samples": "3", "ptmdd.role": "study"})
    for clom, acc in ((0.0, 0.40), (None, 0.45)):
        for s in range(3):
            a = acc + 0.01 * s + (0.003 * s if clom is None else 0.0)
            run.rows.append({"values": {}, "params": {"seed": str(s), "distill.method": "dm", "eval.runs": "3",
                                                      "eval.epochs": "100"},
                             "metrics": {"acc.mean": a, "val.acc.mean": a - 0.01, "baseline.random.mean": 0.3,
                                         "acc.ConvNetW32.mean": a + 0.02, "acc.AlexNet.mean": a - 0.02},
                             "point": {"loss.clom": clom}, "sample": str(s), "run_id": f"r{s}{clom}", "commit": "c"})
    md = write_report(None, "", tmp_path / "report", rows_file=write_rows(run, tmp_path / "cross_arch.parquet"))
    text = Path(md).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| CLoM beats plain DM |"))
    assert "loss.clom=default" in row and "| 3 |" in row and "**holds**" in row
    assert "## Per evaluation architecture" in text

def test_reproduce_sh_parses_and_refuses_an_unknown_study(tmp_path):
    script = ROOT / "bench" / "reproduce.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), "no_such_study"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "ROWS": str(tmp_path / "rows"),
                               "PTMDD": "false"})
    assert proc.returncode == 2 and "no study no_such_study" in proc.stderr
    assert "dc_dsa_digits" in proc.stderr  # it lists the studies there
    assert not (tmp_path / "out").exists()



def _fake_ptmdd(tmp_path: Path, study_rc: int) -> Path:
    """A stand-in for `ptmdd` that logs its arguments and exits ``study_rc`` for `study`."""
    fake = tmp_path / "ptmdd"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path / "calls"}\n'
                    f'[ "$1" = study ] && exit {study_rc}\nexit 0\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("study_rc, rc, rows", [(0, 0, True), (1, 1, True), (2, 2, False)])
def test_reproduce_sh_runs_study_rows_report_per_file(tmp_path, study_rc, rc, rows):
    """Each study: `ptmdd study` with the results, store, RESUME and SETS, then its rows and the
    report from them; failed trials (exit 1) still give rows and a report and exit 1 at the end, a
    refused study (exit 2) stops there."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "ROWS": str(tmp_path / "rows"), "RESUME": "1",
           "PTMDD": str(_fake_ptmdd(tmp_path, study_rc)), "SETS": "--set samples=2 --set 'base.pool.archs=[A, B]'"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "reproduce.sh"), "dc_dsa_digits", "epochs.yaml"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == rc, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    out, rows_dir = tmp_path / "out", tmp_path / "rows"
    assert calls[0] == (f"study bench/repro/studies/dc_dsa_digits.yaml --results {out}/results --store {out}/store "
                        "--resume --set samples=2 --set base.pool.archs=[A, B]")
    if not rows:
        assert len(calls) == 1
        return
    assert calls[1:3] == [f"rows dc_dsa_digits --results {out}/results --out {rows_dir}/dc_dsa_digits.parquet",
                          f"report --from {rows_dir}/dc_dsa_digits.parquet --out {out}/report/dc_dsa_digits"]
    assert len(calls) == 6 and calls[3].startswith("study bench/repro/studies/epochs.yaml ")
    if rc:
        assert "failed trials in: dc_dsa_digits epochs" in proc.stderr

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
