"""Every script in bench/ runs end to end, as a subprocess, at tiny settings (issue 22): none can rot
silently. Each test asserts on what its script prints or writes, so it fails when the script
breaks; the figures themselves are machine noise and are only checked to be there and finite.
The yardsticks ``reference_dc.py`` and ``reference_dm.py`` are modules, not scripts: they run inside
``bench_distill.py`` (DM: tests/test_bench.py; DC: here), and tests/test_bench.py checks them
against the package's losses."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import TINY_BASE
from ptmdd_ray.train import cpu_has_bf16

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# the tiny single-process config shared by the scripts that take one (digits at 8 px, ConvNetW32)
TINY = ["--data", "digits", "--im-size", "8"]


def _env(**extra) -> dict:
    # one thread per process (the tests run beside whatever else the machine runs) and this tree's
    # package first, whatever is installed
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def bench(script: str, *args, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``bench/<script> args`` with this interpreter; it must exit 0."""
    proc = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=cwd)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def finite(x, positive: bool = False) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)


def last_json(stdout: str):
    """The JSON document a script prints last (an indented object or one line)."""
    start = stdout.rindex("\n{\n") + 1 if "\n{\n" in stdout else (0 if stdout.startswith("{") else None)
    if start is None:
        return json.loads(stdout.strip().splitlines()[-1])
    return json.loads(stdout[start:])


def test_every_bench_script_is_run_by_a_test():
    """A new script in bench/ needs a test that runs it (here or in tests/test_bench.py, test_load.py,
    test_reproduction.py);
    a module without a ``__main__`` (the reference loops) needs a script that imports it and a test
    that checks it (tests/test_bench.py)."""
    tests = "".join((ROOT / "tests" / t).read_text() for t in ("test_bench.py", "test_bench_scripts.py",
                                                               "test_load.py", "test_reproduction.py"))
    scripts = "".join(p.read_text() for p in BENCH.glob("*.py"))
    missing = []
    for p in sorted(BENCH.glob("*.py")):
        if 'if __name__ == "__main__":' in p.read_text():
            if f'"{p.name}"' not in tests:
                missing.append(p.name)
        elif f"from {p.stem} import" not in scripts or f"from {p.stem} import" not in tests:
            missing.append(p.name)
    assert not missing, f"bench scripts no test runs: {missing}"


# -- single-process scripts: seconds each --------------------------------------------------------

def test_reading_path_json_counts_the_moves_of_a_real_run():
    out = json.loads(bench("reading_path.py", "--json").stdout)
    assert out["start"] == "pipeline.py:run_distill" and out["followed"] == "the config"
    assert 0 < out["moves"] <= 26 and out["back_up"] == out["moves"] // 2
    assert out["path"][0] == out["path"][-1] == "pipeline.py" and len(out["path"]) == out["moves"] + 1
    assert set(out["path"]) == set(out["files"]) and "methods/loop.py:distill" in out["functions"]


def test_bench_cclom_times_both_ways_per_batch():
    proc = bench("bench_cclom.py", "--data", "digits", "--batches", "16,32", "--steps", "1", "--blocks", "1")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["cclom_batch"] for r in rows] == [16, 32]
    for r in rows:
        assert r["real_images"] > 1000  # digits' training split
        for k in ("seconds_per_step_cached", "seconds_per_step_embedding_every_step", "seconds_to_embed_real_set",
                  "speedup"):
            assert finite(r[k], positive=True), (k, r)
    assert len(re.findall(r"^cclom_batch +\d+: .* s/step embedding every step: [\d.]+x$", proc.stdout, re.M)) == 2


def test_bench_pool_train_times_a_shared_pool_side_by_side_and_one_after_the_other():
    out = json.loads(bench("bench_pool_train.py", *TINY, "--train-per-class", "10", "--epochs", "1", "--repeats", "1",
                           "--json", timeout=300).stdout)
    assert set(out["seconds"]) == {"side_by_side", "one_after_the_other"}
    assert all(len(v) == 1 and finite(v[0], positive=True) for v in out["seconds"].values())
    assert finite(out["speedup"], positive=True) and out["settings"]["ptms"] == 2


def test_bench_store_times_local_and_s3_loads_and_locks():
    out = json.loads(bench("bench_store.py", "--repeats", "3", "--arch", "ConvNetW32", timeout=180).stdout)
    assert out["arch"] == "ConvNetW32" and out["repeats"] == 3 and out["checkpoint_bytes"] > 0
    assert set(out["load"]) == set(out["lock"]) == {"local", "s3"} and finite(out["s3_over_local_p50"], True)
    for stats in [*out["load"].values(), *(op for ops in out["lock"].values() for op in ops.values())]:
        assert set(stats) == {"p50_ms", "p99_ms", "mean_ms", "max_ms"} and all(finite(v) for v in stats.values())


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_profile_dc_splits_an_iteration_into_inner_training_and_matching(method):
    proc = bench("profile_dc.py", "--method", method, *TINY, "--ipc", "2", "--batch-real", "8")
    m = re.fullmatch(rf"{method}: ([\d.]+) s/iter; inner-loop training ([\d.]+) s \((\d+) %\), matching ([\d.]+) s",
                     proc.stdout.strip())
    assert m, proc.stdout
    total, inner, _, matching = (float(g) for g in m.groups())
    assert total > 0 and inner > 0 and matching > 0  # IPC 2: an inner loop to time


def test_bench_scaling_prints_every_point_of_every_axis(tmp_path):
    proc = bench("bench_scaling.py", *TINY, "--ipcs", "1,2", "--classes", "2,10", "--ptms", "1", "--ipc", "1",
                 "--batch-real", "8", "--iters", "1", "--rounds", "1", "--store", tmp_path / "store")
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["axis", "value", "s/iter", "ratio", "linear", "vs", "plain"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], int(r[1])) for r in rows] == [("ipc", 1), ("ipc", 2), ("classes", 2), ("classes", 10), ("PTMs", 1)]
    for r in rows:
        assert finite(float(r[2]), positive=True) and r[3].endswith("x") and r[4].endswith("x")
    assert rows[0][3] == "1.00x" and rows[-1][5].endswith("x")  # the PTM axis: its cost over plain DM


def test_summarize_tabulates_the_runs_of_ptmdd_distill(tmp_path):
    runs = tmp_path / "runs"
    sets = ["model=ConvNetW32", "dataset.im_size=8", "distill.iterations=2", "distill.ipc=1", "distill.batch_real=16",
            "eval.runs=1", "eval.epochs=2", "pool.archs=[ConvNetW32]", "pool.seeds=1", "pool.epoch=1",
            "pretrain.batch=128", f"store={tmp_path / 'store'}"]
    proc = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "distill", "-q",
                           *(a for s in sets for a in ("--set", s)), "--out", str(runs / "tiny_clom")],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = bench("summarize.py", runs).stdout.strip().splitlines()
    assert lines[0].startswith("| run | method | ipc | pool |") and len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:6] == ["tiny_clom", "DM", "1", cells[3], "2000.0", "raw"], cells  # DM's defaults: the authors'
    assert re.fullmatch(r"ConvNetW32/e1 \(\d+%\)", cells[3])
    assert all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", c) for c in cells[6:]), cells


# -- scripts that start processes or run studies: slow --------------------------------------------

@pytest.mark.slow
def test_bench_distill_runs_dc_against_reference_dc(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_distill.py"), "--methods", "dc", "--variants", "plain",
                           "--json", *TINY, "--ipc", "1", "--batch-real", "8", "--iterations", "1",
                           "--store", str(tmp_path / "store"), "--no-compile"],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["failed"] == {} and list(report["results"]) == ["dc"] and list(report["results"]["dc"]) == ["plain"]
    r = report["results"]["dc"]["plain"]
    assert finite(r["seconds_per_iteration"], True) and finite(r["reference_seconds_per_iteration"], True)
    assert r["reference_iterations"] == 2 and len(r["block_speedups"]) == 2  # the DC blocks, 1 iteration each
    assert r["speedup_vs_reference"] == pytest.approx(r["reference_seconds_per_iteration"] / r["seconds_per_iteration"])


@pytest.mark.parametrize("gradient", ["unrolled", "recomputed"])
def test_bench_distill_runs_mtt_against_reference_mtt_with_memory_per_syn_steps(tmp_path, gradient):
    """Issue 26: MTT's s/it against distill.py's step, side by side, and its peak memory at a
    stated syn_steps (the experts trained into the store first), with either gradient."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_distill.py"), "--methods", "mtt", "--variants",
                           "plain,clom", "--json", *TINY, "--ipc", "1", "--iterations", "2", "--syn-steps", "3",
                           "--mtt-gradient", gradient, "--store", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["failed"] == {} and list(report["results"]) == ["mtt"]
    for r in report["results"]["mtt"].values():
        assert r["syn_steps"] == 3 and r["real_images_per_iteration"] == 0 and r["mtt_gradient"] == gradient
        assert finite(r["seconds_per_iteration"], True) and finite(r["reference_seconds_per_iteration"], True)
        assert r["reference_iterations"] == 2 and finite(r["peak_rss_mb"], True)
        assert r["speedup_vs_reference"] == pytest.approx(r["reference_seconds_per_iteration"]
                                                          / r["seconds_per_iteration"])


def test_bench_eval_times_the_grouped_evaluation_against_the_reference_loop():
    proc = bench("bench_eval.py", *TINY, "--archs", "ConvNetW32", "--ipc", "2", "--runs", "2", "--epochs", "2",
                 "--blocks", "2", "--test-per-class", "10", "--no-compile", "--json")
    r = json.loads(proc.stdout)
    assert r["archs"] == ["ConvNetW32"] and r["runs"] == 2 and r["epochs"] == 2 and r["compile"] is False
    assert finite(r["seconds"], True) and finite(r["reference_seconds"], True) and len(r["block_speedups"]) == 2
    assert r["speedup_vs_reference"] == pytest.approx(r["reference_seconds"] / r["seconds"])
    assert 0 <= r["accuracy"]["ConvNetW32"] <= 1 and 0 <= r["reference_accuracy"]["ConvNetW32"] <= 1


def test_pair_eval_pairs_compiled_and_eager_evaluations_by_seed():
    proc = bench("pair_eval.py", *TINY, "--ipc", "2", "--runs", "1", "--epochs", "2", "--seeds", "2",
                 "--test-per-class", "10", "--json", timeout=600)
    r = json.loads(proc.stdout)
    assert len(r["eager"]) == len(r["compiled"]) == 2 and r["seeds"] == 2
    assert r["diff"] == pytest.approx(sum(c - e for c, e in zip(r["compiled"], r["eager"])) / 2)
    assert 0 <= r["p"] <= 1 and r["verdict"] in ("no significant difference", "significant difference")


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU computes no bf16 natively")
def test_pair_eval_pairs_fp32_and_bf16_cpu_evaluations_by_seed():
    proc = bench("pair_eval.py", "--compare", "precision", *TINY, "--ipc", "2", "--runs", "1", "--epochs", "2",
                 "--seeds", "2", "--test-per-class", "10", "--json", timeout=600)
    r = json.loads(proc.stdout)
    assert r["sides"] == ["fp32", "bf16-cpu"] and len(r["fp32"]) == len(r["bf16-cpu"]) == 2
    assert r["diff"] == pytest.approx(sum(b - f for b, f in zip(r["bf16-cpu"], r["fp32"])) / 2)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU computes no bf16 natively")
def test_pair_distill_pairs_fp32_and_bf16_cpu_distillations_by_seed_on_validation():
    proc = bench("pair_distill.py", *TINY, "--train-per-class", "20", "--val-per-class", "5", "--ipc", "1",
                 "--iterations", "2", "--batch-real", "4", "--ptm-epochs", "1", "--runs", "1", "--epochs", "2",
                 "--seeds", "2", "--json", timeout=600)
    r = json.loads(proc.stdout)
    assert r["sides"] == ["fp32", "bf16-cpu"] and len(r["fp32"]) == len(r["bf16-cpu"]) == 2
    for split in ("val", "test"):
        assert r[split]["diff"] == pytest.approx(sum(b[split] - f[split] for b, f in zip(r["bf16-cpu"], r["fp32"])) / 2)
    assert r["verdict"] == ("significant difference" if r["val"]["p"] < 0.05 else "no significant difference")


def test_pair_distill_pairs_eager_and_compiled_dsa_unguided_and_resumes_from_its_rows(tmp_path):
    """``--rows``: each finished trial is written as it ends; a second call runs only the trials the
    file lacks (a kept row is read back, not run again; a missing one is run, to the same figures);
    a rows file of other settings is one line, exit 1."""
    args = ["--compare", "compile", "--method", "dsa", "--clom", "0", *TINY, "--train-per-class", "20",
            "--val-per-class", "5", "--ipc", "1", "--iterations", "1", "--batch-real", "4", "--runs", "1",
            "--epochs", "2", "--seeds", "2", "--rows", tmp_path / "rows.json", "--json"]
    r = json.loads(bench("pair_distill.py", *args, timeout=600).stdout)
    assert r["sides"] == ["eager", "compiled"] and r["settings"]["method"] == "dsa"
    assert all(0 <= row[s] <= 100 for side in ("eager", "compiled") for row in r[side] for s in ("val", "test"))
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert saved["rows"]["eager"]["0"] == r["eager"][0] and saved["rows"]["compiled"]["1"] == r["compiled"][1]
    saved["rows"]["eager"]["0"]["val"] = 12.5  # a marker: read back, not recomputed
    del saved["rows"]["compiled"]["1"]  # an interrupted run's missing trial
    (tmp_path / "rows.json").write_text(json.dumps(saved))
    again = json.loads(bench("pair_distill.py", *args, timeout=600).stdout)
    assert again["eager"][0]["val"] == 12.5 and again["compiled"][1] == r["compiled"][1]
    other = subprocess.run([sys.executable, str(BENCH / "pair_distill.py"), *map(str, args[:-1]), "--seeds", "3"],
                           capture_output=True, text=True, timeout=600, env=_env())
    assert other.returncode == 1 and other.stderr.strip().splitlines()[-1] == (
        f"pair_distill.py: error: --rows {tmp_path / 'rows.json'}: written with other settings (seeds)")


def test_dc_classes_vmap_computes_the_same_matching_loss_both_ways():
    proc = bench("dc_classes_vmap.py", "--classes", "3", "--batch-real", "4", "--ipc", "2", "--im-size", "8",
                 "--channels", "1", "--reps", "1", "--json")
    r = json.loads(proc.stdout)
    assert r["loss_vmap"] == pytest.approx(r["loss_loop"], rel=1e-4)
    assert r["grad_max_abs_diff"] <= 1e-4 * r["grad_max_abs"] + 1e-8
    assert finite(r["loop_seconds"], True) and finite(r["vmap_seconds"], True)


def test_bench_trial_times_every_phase_of_a_trial_both_ways():
    proc = bench("bench_trial.py", *TINY, "--train-per-class", "30", "--test-per-class", "10", "--ipc", "2",
                 "--iterations", "3", "--batch-real", "8", "--ptm-epochs", "1", "--runs", "1", "--eval-epochs", "2",
                 "--distill-compile", "on",
                 *(["--precision", "bf16-cpu"] if cpu_has_bf16() else []), "--json")
    r = json.loads(proc.stdout)
    assert r["settings"]["precision"] == ("bf16-cpu" if cpu_has_bf16() else "bf16") and r["distill_compile"]
    assert list(r["phases"]) == ["pretrain", "distill", "eval_synthetic", "eval_baseline"]
    for phase in r["phases"].values():
        assert finite(phase["seconds"], True) and finite(phase["reference_seconds"], True)
    assert r["seconds"] == pytest.approx(sum(p["seconds"] for p in r["phases"].values()))
    assert 0 <= r["phases"]["eval_synthetic"]["accuracy"] <= 1 and 0 <= r["phases"]["eval_baseline"]["reference_accuracy"] <= 1


def _tiny_study(name: str, iterations: int) -> dict:
    base = {**TINY_BASE, "distill": {**TINY_BASE["distill"], "iterations": iterations, "batch_real": 16},
            "pool": {"archs": []}, "loss": {"clom": 0.0}, "eval": {"runs": 1, "epochs": 2, "baseline": False}}
    return {"name": name, "metric": "val.acc.mean", "base": base, "sweep": {"distill.ipc": {"grid": [1]}},
            "samples": 2, "max_concurrent": 2, "resources": {"cpu": 1, "gpu": 0}}


@pytest.mark.slow
def test_compare_studies_pairs_two_real_studies_by_seed(tmp_path):
    results = tmp_path / "results"
    paths = []
    for name, iterations in (("first", 2), ("second", 4)):
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(_tiny_study(name, iterations)))
    # both studies in one process: one local Ray start (Ray stops with the process)
    code = ("import sys\nfrom ptmdd_ray.study import run_study\nfrom ptmdd_ray.study_spec import load_study\n"
            "for path in sys.argv[2:]:\n"
            "    s = run_study(load_study(path), store=sys.argv[1] + '/store', results=sys.argv[1], quiet=True)\n"
            "    assert s['errors'] == 0, s\n")
    proc = subprocess.run([sys.executable, "-c", code, str(results), *map(str, paths)], capture_output=True,
                          text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = bench("compare_studies.py", "first", "second", "--results", results, cwd=tmp_path).stdout.splitlines()
    assert lines[0] == "| point | metric | first | second | difference [95% CI], p |"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[:2] for r in rows] == [["distill.ipc=1", "acc.mean"], ["distill.ipc=1", "val.acc.mean"]], lines
    for r in rows:
        assert all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", c) for c in r[2:4]), r
        assert re.fullmatch(r"[+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\], p = \S+ \(n = 2\)", r[4]), r


def _study_rows_are_sane(row: dict, trials: int) -> None:
    assert row["trials"] == trials and row["errors"] == 0, row
    for k in ("wall_s", "trial_s", "efficiency", "trials_per_hour", "peak_rss_mb", "private_mb"):
        assert finite(row[k], positive=True), (k, row)
    assert 0 < row["efficiency"] <= 1.0 + 1e-6 and finite(row["outside_share"])


@pytest.mark.slow
def test_bench_study_savings_and_throughput_on_a_tiny_study(tmp_path):
    spec = _tiny_study("tiny", 2)
    spec["base"] = {**spec["base"], "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 1}, "loss": {"clom": 30.0}}
    spec["sweep"] = {"loss.clom": {"grid": [10.0, 30.0]}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = bench("bench_study.py", "--studies", path, "--throughput", path, "--slot-counts", "2", "--samples", "1",
                 "--out", tmp_path / "out", timeout=600, cwd=tmp_path)
    rows = last_json(proc.stdout[:proc.stdout.rindex("\n| run |")])  # the JSON, then the table
    assert list(rows) == ["tiny", "tiny warm, 2 slot(s)"]
    for row in rows.values():
        _study_rows_are_sane(row, 2)
    # one PTM run serves both trials of the study; each trial on its own store would train its own
    assert rows["tiny"]["ptm_trainings"] == 1 and rows["tiny"]["ptm_trainings_per_trial"] == 2
    table = proc.stdout[proc.stdout.rindex("\n| run |"):].strip().splitlines()
    assert len(table) == 4 and table[2].startswith("| tiny | 2 |") and "| 1 (2) |" in table[2]


@pytest.mark.slow
def test_bench_study_efficiency_times_each_trials_phases(tmp_path):
    proc = bench("bench_study.py", "--efficiency", "--iterations", "2", "--ipc", "1", "--slots", "2",
                 "--set", "samples=1", "--set", "base.pool.epoch=1", "--set", "base.pool.seeds=1",
                 "--set", "base.dataset.im_size=8", "--set", "base.distill.batch_real=16",
                 "--set", "base.eval.runs=1", "--set", "base.eval.epochs=2", "--out", tmp_path / "out",
                 "--after", "base.eval.epochs=3", timeout=900, cwd=tmp_path)
    rows = last_json(proc.stderr)  # --efficiency: the tables on stdout, the JSON on stderr
    assert list(rows) == ["before, warm store, 2 slots", "after, warm store, 2 slots", "speedup"]
    before, after, speedup = rows.values()
    assert speedup["ratio"] == pytest.approx(after["trials_per_hour"] / before["trials_per_hour"])
    assert speedup["after"] == ["base.eval.epochs=3"] and "trials per hour: before" in proc.stdout
    e = before
    assert e["trials"] == 2 and e["slots"] == 2 and finite(e["wall_s"], True) and len(e["rows"]) == 2
    for k in ("worker", "mlflow", "work"):
        assert finite(e[f"sum_trial_s.{k}"], True) and finite(e[f"efficiency.{k}"], True)
    assert all(finite(v) for v in e["slot_s"].values()) and all(finite(v) for v in e["driver_s"].values())
    for r in e["rows"]:
        assert all(finite(r[k]) for k in ("gap_s", "claim_s", "data_s", "distill_s", "eval_s", "trial_s.work"))
    assert "before, warm store, 2 slots: 2 trials, 2 slots, wall" in proc.stdout and "| slot | reused_process |" in proc.stdout


@pytest.mark.slow
def test_bench_study_memory_compares_shared_and_per_trial_data(tmp_path):
    proc = bench("bench_study.py", "--memory", "--data", "digits", "--set", "base.dataset.im_size=8",
                 "--set", "base.distill.iterations=2", "--set", "base.distill.batch_real=16",
                 "--set", "base.eval.runs=1", "--set", "base.eval.archs=[ConvNetW32]", "--out", tmp_path / "out",
                 timeout=600, cwd=tmp_path)
    rows = last_json(proc.stdout[:proc.stdout.rindex("\n| run |")])
    assert list(rows) == ["memory shared=True", "memory shared=False"]
    for row in rows.values():
        _study_rows_are_sane(row, 2)  # the plain-DM case, 2 samples


@pytest.mark.slow
def test_bench_cluster_runs_both_layouts_on_local_clusters(tmp_path):
    proc = bench("bench_cluster.py", "--samples", "1", "--iterations", "2", "--eval-epochs", "1", "--im-size", "8",
                 "--grid", "0,30", "--out", tmp_path / "cluster", timeout=900, cwd=tmp_path)
    report = last_json(proc.stdout)
    assert finite(report["data_set_mb"], True)
    assert list(report["layouts"]) == ["1 node x 2 CPUs", "2 nodes x 1 CPU"]
    for row in report["layouts"].values():
        assert row["trials"] == 2 and finite(row["wall_s"], True) and finite(row["trials_per_hour"], True)
        assert 0 < row["scheduling_efficiency"] <= 1 and row["objstore_mb_per_node"]
    assert 1 <= len(report["layouts"]["2 nodes x 1 CPU"]["objstore_mb_per_node"]) <= 2
    # local_cluster.sh down stopped every process it started
    left = [p for d in (tmp_path / "cluster").rglob("pids") for p in d.iterdir()]
    assert not left, left


def test_paper_scale_says_there_is_no_cuda_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA even on a machine that has it
    proc = subprocess.run(["bash", str(BENCH / "paper_scale.sh")], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert "paper_scale: no CUDA device here" in proc.stdout


def test_paper_scale_runs_its_steps_and_cuts_the_evaluation_to_its_budget(tmp_path):
    out = tmp_path / "ps.json"
    proc = bench("paper_scale.py", "--data", "digits", "--im-size", "8", "--train-per-class", "20",
                 "--test-per-class", "10", "--model", "ConvNetW32", "--ipc", "2", "--iterations", "3",
                 "--batch-real", "8", "--ptm-epoch", "1", "--eval-runs", "3", "--eval-epochs", "40",
                 "--budget-s", "1", "--device", "cpu", "--out", str(out), timeout=600)
    r = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == r
    assert list(r["sets"]) == ["dm", "dm+clom", "random real"] and r["sets"]["dm+clom"]["clom"] == 2000.0
    assert r["eval_runs"] == 1 and r["eval_shortened"] and "cut from 3 to 1 models" in r["eval_note"]
    assert r["iterations"] == 1 and r["distill_shortened"] and "distillation cut from 3 to 1" in r["eval_note"]
    assert r["resolved"]["pretrain"]["weight_decay"] == 5e-3 and r["eval_seconds_per_model_epoch"] > 0
    assert all(len(s["accuracy_runs"]) == 1 and 0 <= s["accuracy_mean"] <= 100 for s in r["sets"].values())
    assert r["published"]["dm"]["mean"] == 48.9 and "published DM" in proc.stderr


def test_paper_scale_cuts_the_evaluation_before_the_distillation():
    """The budget plan: all of it when it fits; else fewer evaluation models (at least 1 per set),
    and fewer iterations only when one model per set does not fit either."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("paper_scale", BENCH / "paper_scale.py")
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)
    args = SimpleNamespace(eval_runs=5, eval_epochs=1000, iterations=20000)
    # 0.01 s/it for both distillations (200 s), 0.004 s per model-epoch: 4 s a model, 12 s a model per 3 sets
    assert ps.plan(0.004, 0.01, args, 3, 300.0) == (5, 20000)    # 200 + 60 fits
    assert ps.plan(0.004, 0.01, args, 3, 240.0) == (3, 20000)    # 40 s left for evaluation: 3 models
    assert ps.plan(0.004, 0.01, args, 3, 205.0) == (1, 19300)    # one model (12 s) leaves 193 s: 19,300 its
    assert ps.plan(0.004, 0.01, args, 3, -5.0) == (1, 1)         # nothing fits: the least of each

