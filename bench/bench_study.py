"""What the study service saves, measured on real studies on the local Ray (a benchmark, not a test).

    .venv/bin/python bench/bench_study.py [--studies diversity epochs] [--samples 1] [--out runs/bench_study]
        [--throughput epochs] [--slot-counts 1,2]

Prints, per shipped study (run at its CPU scale on ``digits`` with a fresh checkpoint store):
- PTM trainings done (the store's counter) vs. what the trials would have trained each on its own
  (the sum over trials of the PTM runs in their pools);
- scheduling: study wall time vs. the sum of trial times (MLflow run start to end) divided by the
  parallel slots (``max_concurrent``); efficiency = that ideal / wall; the rest is Ray, Tune,
  MLflow and the PTM trainings the trials waited for;
- throughput: trials per hour of the ``epochs`` study at 1 and 2 concurrent trials on the warm
  store (no trainings), and the share of wall time outside trial work;
- efficiency (``--efficiency``): a study of real-length trials on ``digits`` (IPC 10, 500 DM
  iterations: 60+ s each on one core), 6 trials on 2 slots, its PTMs trained in a warm-up first
  (``--cold``: also a run whose trials train them); wall time, the sum of trial times three ways
  (worker process, MLflow run, the pipeline's own work) and efficiency on each, and per trial where
  the fixed costs go (worker start and imports, MLflow claim and start, data, pool, distill, eval,
  MLflow logging, the gap to the next trial in its slot); with ``--after KEY=VALUE ...`` (e.g. the fast
  paths: ``base.precision=bf16-cpu base.distill.compile=true base.eval.compile=true``) each run is
  made twice in a row, as the study is ("before") and with those overrides ("after"), each on its own
  warm store, and the trials per hour of both and their ratio are printed;
- memory (``--memory``): mean per-trial peak RSS and private memory of a tiny CIFAR-10 study
  (the Parquet, ~740 MB of float tensors) with the data set shared through the object store vs.
  loaded in every trial.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(study, out: Path, store: Path, name: str, share_data: bool = True) -> dict:
    import mlflow

    from ptmdd_ray.study import run_study

    results = out / name
    shutil.rmtree(results, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_study(study, store=str(store), results=str(results), share_data=share_data)
    wall = time.perf_counter() - t0
    client = mlflow.MlflowClient(summary["tracking_uri"])
    runs = client.search_runs([client.get_run(summary["parent_run_id"]).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}' and "
                              "attributes.status = 'FINISHED'", max_results=10000)
    trial_s = [(r.info.end_time - r.info.start_time) / 1000 for r in runs]
    slots = study.spec.max_concurrent
    return {"trials": len(runs), "errors": summary["errors"], "wall_s": wall, "trial_s": sum(trial_s),
            "efficiency": sum(trial_s) / slots / wall, "outside_share": 1 - sum(trial_s) / (slots * wall),
            "trials_per_hour": 3600 * len(runs) / wall,
            "peak_rss_mb": statistics.fmean(r.data.metrics.get("mem.peak_rss_mb", float("nan")) for r in runs),
            "private_mb": statistics.fmean(r.data.metrics.get("mem.private_mb", float("nan")) for r in runs)}


def trial_timelines(summary: dict) -> list[dict]:
    """Each finished trial's phases (unix times, the ``time.*`` of its final Tune report) and its
    MLflow run's start and end, read back from the experiment directory and the tracking store."""
    import mlflow

    client = mlflow.MlflowClient(summary["tracking_uri"])
    runs = client.search_runs([client.get_run(summary["parent_run_id"]).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}' and "
                              "attributes.status = 'FINISHED'", max_results=10000)
    by_trial = {r.data.tags["ptmdd.trial_id"]: r for r in runs}
    out = []
    for f in sorted(Path(summary["results"]).glob("*/result.json")):
        final = [r for r in map(json.loads, f.read_text().splitlines()) if r.get("trial.final")]
        if not final or final[-1]["trial_id"] not in by_trial:
            continue
        r, run = final[-1], by_trial[final[-1]["trial_id"]]
        t = {k[5:]: v for k, v in r.items() if k.startswith("time.")}
        t.update(run_start=run.info.start_time / 1000, run_end=run.info.end_time / 1000, pid=r["pid"],
                 distill_s=r["distill.seconds"], eval_s=r["eval.seconds"], cached=r.get("baseline.random.cached", 0))
        out.append(t)
    return sorted(out, key=lambda t: t["enter"])


def efficiency_table(tl: list[dict], t0: float, t1: float, slots: int, driver: dict | None = None) -> dict:
    """Slots assigned by time (a trial takes the slot freed last before it entered); the three trial
    times and their efficiencies; each trial's fixed costs and the idle gap before it in its slot."""
    free = [(t0, None)] * slots  # (when the slot was freed, pid of the trial that held it)
    rows = []
    for t in tl:
        same = [j for j in range(slots) if free[j][1] == t["pid"]]  # a reused worker keeps its slot
        i = same[0] if same else max((j for j in range(slots) if free[j][0] <= t["enter"] + 1e-3),
                                     key=lambda j: free[j][0], default=min(range(slots), key=lambda j: free[j][0]))
        prev, prev_pid = free[i]
        work = t["distilled"] - t["data"] - t["baseline_wait_s"]  # idle while a neighbour evaluates the baseline
        rows.append({
            "slot": i, "pid": t["pid"], "reused_process": prev_pid == t["pid"],
            "gap_s": t["enter"] - prev,  # the slot idle: previous trial (or study start) to this one's first line
            "worker_start_s": max(0.0, t["enter"] - max(t["process"], prev)),  # of the gap: in this process
            "claim_s": t["claimed"] - t["enter"], "mlflow_start_s": t["started"] - t["claimed"],
            "data_s": t["data"] - t["started"], "pool_s": t["pool_s"], "distill_s": t["distill_s"],
            "eval_s": t["eval_s"], "baseline_wait_s": t["baseline_wait_s"], "baseline_cached": t["cached"],
            "guide_s": t["guide_s"], "ckpt_load_s": t["checkpoint_load_s"], "ckpt_save_s": t["checkpoint_save_s"],
            "outputs_other_s": work + t["baseline_wait_s"] - t["pool_s"] - t["guide_s"] - t["checkpoint_load_s"]
            - t["distill_s"] - t["eval_s"],
            "mlflow_log_s": t["logged"] - t["distilled"],
            "trial_s.worker": t["logged"] - max(t["process"], prev), "trial_s.mlflow": t["run_end"] - t["run_start"],
            "trial_s.work": work})
        free[i] = (t["logged"], t["pid"])
    wall = t1 - t0
    out = {"trials": len(rows), "slots": slots, "wall_s": wall, "tail_s": [t1 - f for f, _ in free], "rows": rows}
    if driver:  # the driver's phases before the first trial and after the last
        d = {**driver, "first_enter": min(t["enter"] for t in tl), "last_end": max(f for f, _ in free)}
        steps = [("checks and data", "start", "checked"), ("Ray start", "checked", "ray"),
                 ("MLflow parent", "ray", "parent"), ("data put, Tune setup", "parent", "fit"),
                 ("Tune to first trial's first line", "fit", "first_enter"),
                 ("last trial end to Tune's end", "last_end", "fitted"), ("summary and report", "fitted", "summarised"),
                 ("close", "summarised", "end")]
        out["driver_s"] = {"before run_study": d["start"] - t0, **{n: d[b] - d[a] for n, a, b in steps},
                           "after run_study": t1 - d["end"]}
    for k in ("worker", "mlflow", "work"):
        total = sum(r[f"trial_s.{k}"] for r in rows)
        out[f"sum_trial_s.{k}"], out[f"efficiency.{k}"] = total, total / slots / wall
    # where the slots' time went (slots x wall, exactly): own work, waits for a neighbour's baseline,
    # MLflow and data bookkeeping inside trials, gaps before trials (the first: the study's start-up)
    # and the tails after each slot's last trial
    first = {r["slot"]: r for r in reversed(rows)}
    out["slot_s"] = {"work": out["sum_trial_s.work"], "baseline waits": sum(r["baseline_wait_s"] for r in rows),
                     "in-trial bookkeeping": sum(r["claim_s"] + r["mlflow_start_s"] + r["data_s"] + r["mlflow_log_s"]
                                                 for r in rows),
                     "start-up (first gap per slot)": sum(r["gap_s"] for r in first.values()),
                     "gaps between trials": sum(r["gap_s"] for r in rows) - sum(r["gap_s"] for r in first.values()),
                     "tails": sum(out["tail_s"])}
    later = [r for r in rows if r not in first.values()]
    out["fixed_per_later_trial_s"] = statistics.fmean(
        r["gap_s"] + r["claim_s"] + r["mlflow_start_s"] + r["data_s"] + r["mlflow_log_s"] for r in later) if later else None
    return out


def print_efficiency(name: str, e: dict) -> None:
    print(f"\n{name}: {e['trials']} trials, {e['slots']} slots, wall {e['wall_s']:.1f} s; tail (last trial end "
          f"to study end) per slot: {', '.join(f'{x:.1f}' for x in e['tail_s'])} s")
    for k, what in (("worker", "worker process start (or the slot's previous trial) to end"),
                    ("mlflow", "MLflow run start to end"),
                    ("work", "the pipeline's own work (pool, distill, eval, outputs; not baseline waits)")):
        print(f"  trial time = {what}: sum {e[f'sum_trial_s.{k}']:.1f} s, efficiency {e[f'efficiency.{k}']:.3f}")
    if "driver_s" in e:
        print("  driver: " + ", ".join(f"{k} {v:.1f} s" for k, v in e["driver_s"].items()))
    total = e["slots"] * e["wall_s"]
    print("  slot time: " + ", ".join(f"{k} {v:.1f} s ({100 * v / total:.1f} %)" for k, v in e["slot_s"].items()))
    if e["fixed_per_later_trial_s"] is not None:
        print(f"  fixed cost per trial after a slot's first (gap + MLflow + data): {e['fixed_per_later_trial_s']:.2f} s")
    cols = ["slot", "reused_process", "gap_s", "worker_start_s", "claim_s", "mlflow_start_s", "data_s", "pool_s",
            "guide_s", "ckpt_load_s", "distill_s", "ckpt_save_s", "eval_s", "baseline_wait_s", "outputs_other_s",
            "mlflow_log_s", "trial_s.mlflow", "trial_s.work"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in e["rows"]:
        print("| " + " | ".join(str(r[c]) if isinstance(r[c], (bool, int)) else f"{r[c]:.2f}" for c in cols) + " |")


def efficiency(args, out: Path) -> dict:
    """Real-length trials, PTMs warm (and cold with ``--cold``); see the module docstring."""
    import ray

    from ptmdd_ray.pipeline import run_pretrain
    from ptmdd_ray.study_spec import load_study

    sets = [f"base.distill.iterations={args.iterations}", f"base.distill.ipc={args.ipc}",
            f"max_concurrent={args.slots}", "name=efficiency", *args.set]
    variants = {"": load_study(ROOT / "bench" / "efficiency.yaml", sets)}
    if args.after:
        variants = {"before, ": variants[""], "after, ": load_study(ROOT / "bench" / "efficiency.yaml", sets + args.after)}
    warm_of = {label: out / ("store-warm-after" if label.startswith("after") else "store-warm") for label in variants}
    for label, study in variants.items():
        warm = warm_of[label]  # the PTMs of the variant's precision
        if not (warm / "ptm").exists():  # the warm-up: the pool's PTMs, trained once, outside any study
            t = time.perf_counter()
            run_pretrain(replace(study.trial_config(study.grid[0], 0), store=str(warm)), progress=False)
            print(f"warm-up {label}PTMs trained in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rows = {}
    for mode in (["cold"] if args.cold else []) + ["warm"] * args.repeats:
        for label, study in variants.items():  # before and after in turn: drift hits both alike
            e = efficiency_run(args, out / f"efficiency-{len(rows)}", study, warm_of[label] if mode == "warm" else None)
            key = f"{label}{mode} store, {args.slots} slots" + (f" #{len(rows)}" if mode == "warm" and args.repeats > 1 else "")
            rows[key] = e
            print_efficiency(key, e)
            if args.fresh_ray:
                ray.shutdown()
    ray.shutdown()
    if args.after:
        rate = {label: statistics.fmean(e["trials_per_hour"] for k, e in rows.items() if k.startswith(f"{label}warm"))
                for label in variants}
        rows["speedup"] = {"trials_per_hour_before": rate["before, "], "trials_per_hour_after": rate["after, "],
                           "ratio": rate["after, "] / rate["before, "], "after": args.after}
        print(f"\ntrials per hour: before {rate['before, ']:.1f}, after {rate['after, ']:.1f} "
              f"({' '.join(args.after)}): {rows['speedup']['ratio']:.2f}x")
    return rows


def efficiency_run(args, out: Path, study, warm: Path | None) -> dict:
    """One run of ``study`` in the fresh folder ``out`` (its store a copy of ``warm``'s PTMs, if
    given; its own results folder, as MLflow keeps its database open in this process)."""
    from ptmdd_ray.study import run_study

    shutil.rmtree(out, ignore_errors=True)
    store = out / "store"
    if warm is not None:
        shutil.copytree(warm, store)  # the PTMs only: every run evaluates its baselines itself
    results = out / "results"
    t0 = time.time()
    summary = run_study(study, store=str(store), results=str(results), quiet=True,
                        **({"reuse_actors": False} if args.no_reuse else {}))
    t1 = time.time()
    assert summary["errors"] == 0, summary
    e = efficiency_table(trial_timelines(summary), t0, t1, args.slots, summary.get("timing"))
    e["trials_per_hour"] = 3600 * e["trials"] / e["wall_s"]
    return e


def study_file(name: str) -> Path:
    """A shipped study by name (``studies/<name>.yaml``), or a study YAML by path."""
    return Path(name) if name.endswith((".yaml", ".yml")) else ROOT / "studies" / f"{name}.yaml"


def per_trial_trainings(study) -> int:
    """PTM runs the trials would train if each had its own store (one per (arch, seed) of its pool)."""
    from ptmdd_ray.config import uses_ptms
    from ptmdd_ray.pool import pool_specs

    return sum(len(pool_specs(cfg)) for point in study.grid for s in range(study.spec.samples)
               if uses_ptms(cfg := study.trial_config(point, s)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", nargs="+", default=["diversity", "epochs"],
                    help="shipped study names (studies/NAME.yaml) or study YAML paths")
    ap.add_argument("--throughput", default="epochs", help="the study (name or path) run on the warm store per slot count")
    ap.add_argument("--slot-counts", default="1,2", help="the throughput runs' max_concurrent values")
    ap.add_argument("--samples", type=int, default=1, help="samples per grid point (the shipped files use 3)")
    ap.add_argument("--set", action="append", default=[], help="extra study overrides, key=value")
    ap.add_argument("--out", default="runs/bench_study")
    ap.add_argument("--memory", action="store_true", help="only the shared vs per-trial memory comparison")
    ap.add_argument("--data", default="parquet:../shared/data/cifar10-jpeg.parquet")
    ap.add_argument("--efficiency", action="store_true", help="only the real-length scheduling measurement")
    ap.add_argument("--iterations", type=int, default=500, help="--efficiency: DM iterations per trial")
    ap.add_argument("--ipc", type=int, default=10, help="--efficiency: images per class")
    ap.add_argument("--slots", type=int, default=2, help="--efficiency: max_concurrent (1 CPU each)")
    ap.add_argument("--cold", action="store_true", help="--efficiency: first a run whose trials train the PTMs")
    ap.add_argument("--repeats", type=int, default=1, help="--efficiency: warm runs")
    ap.add_argument("--no-reuse", action="store_true", help="--efficiency: a new worker process per trial")
    ap.add_argument("--fresh-ray", action="store_true", help="--efficiency: a new local Ray for every run")
    ap.add_argument("--after", nargs="+", default=[], metavar="KEY=VALUE",
                    help="--efficiency: also run the study with these overrides, in turn with it, and compare trials/h")
    args = ap.parse_args()

    import ray

    from ptmdd_ray.store import CheckpointStore
    from ptmdd_ray.study_spec import load_study

    out = Path(args.out).resolve()
    rows = {}
    if args.efficiency:
        rows = efficiency(args, out)
        print(json.dumps(rows, indent=1), file=sys.stderr)
        return
    if args.memory:
        sets = [f"base.dataset.name={args.data}", "base.distill.iterations=5", "base.distill.ipc=10",
                "base.eval.epochs=2", "base.eval.runs=3", "base.eval.baseline=false", "base.dataset.im_size=32",
                "samples=2", "max_concurrent=2", "name=memory"]
        study = load_study(ROOT / "studies" / "quickstart.yaml", sets + args.set)
        study = replace(study, grid=study.grid[:1])
        for shared in (True, False):
            rows[f"memory shared={shared}"] = run(study, out, out / "store-mem", f"mem-{shared}", share_data=shared)
    else:
        for given in args.studies:
            name = Path(given).stem
            store = out / f"store-{name}"
            shutil.rmtree(store, ignore_errors=True)
            study = load_study(study_file(given), [f"samples={args.samples}", *args.set])
            r = run(study, out, store, name)
            r["ptm_trainings"] = CheckpointStore(store).stats()["trainings"]
            r["ptm_trainings_per_trial"] = per_trial_trainings(study)
            rows[name] = r
        name = Path(args.throughput).stem
        study = load_study(study_file(args.throughput), [f"samples={args.samples}", *args.set])
        for slots in (int(v) for v in args.slot_counts.split(",") if v.strip()):
            one = replace(study, spec=replace(study.spec, max_concurrent=slots))
            rows[f"{name} warm, {slots} slot(s)"] = run(one, out, out / f"store-{name}", f"{name}-{slots}")
    ray.shutdown()
    print(json.dumps(rows, indent=1))
    print("\n| run | trials | wall s | sum trial s | efficiency | outside trials | trials/h | PTM trainings "
          "(per-trial) | peak RSS MB | private MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        ptm = f"{r['ptm_trainings']} ({r['ptm_trainings_per_trial']})" if "ptm_trainings" in r else "-"
        print(f"| {k} | {r['trials']} | {r['wall_s']:.0f} | {r['trial_s']:.0f} | {r['efficiency']:.2f} | "
              f"{100 * r['outside_share']:.0f} % | {r['trials_per_hour']:.0f} | {ptm} | {r['peak_rss_mb']:.0f} | "
              f"{r['private_mb']:.0f} |")


if __name__ == "__main__":
    main()
