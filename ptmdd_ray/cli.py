"""``ptmdd``: the command line.

    ptmdd distill [CONFIG.yaml] [--set key=value ...] --out DIR
    ptmdd pretrain [CONFIG.yaml] [--set key=value ...]
    ptmdd evaluate SYNTHETIC.parquet [--config CONFIG.yaml] [--set key=value ...] [--out FILE]
    ptmdd store ls|stats|gc [--store URI] [--json]
    ptmdd report STUDY [--mlflow-uri URI] [--results R] [--sync] --out DIR   (or: --from ROWS.parquet --out DIR)
    ptmdd rows STUDY [--mlflow-uri URI] [--results R] --out ROWS.parquet
    ptmdd study STUDY.yaml [--set key=value ...] [--address A] [--mlflow-uri U] [--store S] [--results R] [--resume]
    ptmdd search STUDY.yaml --trials N [--prune] [--optuna-storage URL] [--address A] [--mlflow-uri U] [--store S]
    ptmdd config [--method dc|dsa|dm] [--json]

Every subcommand's ``--help`` shows the defaults of its options and an example; ``ptmdd config`` lists
the config keys that ``--set``, sweeps and searches take.

Bad input exits with status 2 and one line on stderr naming the key; nothing is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .config import METHODS

log = logging.getLogger("ptmdd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2, like every other input error
        self.exit(2, f"ptmdd: error: {message}\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default appended to its help, so ``--help`` answers "what if I leave it out";
    skipped where the help already says it or there is nothing to show (a flag that is off, an option
    that does nothing unless given, an empty repeatable one, a required one). The epilog's example
    keeps its line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = (None, False, argparse.SUPPRESS)
        nothing = action.default == [] or any(action.default is v for v in unset)
        if "default" in text or action.required or nothing:
            return text
        return super()._get_help_string(action)


def _pct(s: dict | None) -> str:
    """An accuracy's ``{mean, std}`` as the report writes it, in %."""
    from .report import pm_of

    return "-" if not s else f"{pm_of(s['mean'], s['std'])} %"


def summary_table(result: dict) -> str:
    cfg = result["config"]
    d = cfg["distill"]
    lines = [f"{d['method'].upper()}  ipc {d['ipc']}  {cfg['dataset']['name']}  model {cfg['model']}  "
             f"iterations {result['timing']['iterations']}  "
             f"({result['timing']['seconds_per_iteration']:.4f} s/it)"]
    pool = result.get("pool") or []
    if pool:
        lines.append(f"pool: {len(pool)} PTMs " + ", ".join(
            f"{p['arch']}/s{p['seed']}/e{p['epoch']} ({100 * p['test_accuracy']:.1f}%)" for p in pool)
            + f"  clom={cfg['loss']['clom']} cclom={cfg['loss']['cclom']}")
    runs = next(iter(result["accuracy"].values()))["runs"]
    lines.append(f"{'eval arch':<16}{'synthetic':>20}{'random real':>20}   ({len(runs)} runs each)")
    lines += _accuracy_rows(result)
    return "\n".join(lines)


def _accuracy_rows(result: dict) -> list[str]:
    """One line per eval arch and split: test, then validation where the run held one out."""
    lines = []
    for split, acc_key, base_key in (("test", "accuracy", "baseline_random"), ("val", "val_accuracy",
                                                                               "baseline_random_val")):
        base = result.get(base_key) or {}
        for arch, acc in (result.get(acc_key) or {}).items():
            name = arch if split == "test" else f"{arch} (val)"
            lines.append(f"{name:<16}{_pct(acc):>20}{_pct(base.get(arch)):>20}")
    return lines


def _config(args):
    """The validated config of a ``distill``/``pretrain`` call: file (or defaults) + ``--set``."""
    from .config import load_config

    return load_config(args.config, args.set)


def cmd_distill(args) -> int:
    cfg = _config(args)  # validated before torch is imported: a bad config is answered at once
    from .pipeline import run_distill

    result = run_distill(cfg, args.out, progress=not args.quiet)
    print(summary_table(result))
    print(f"wrote {Path(args.out) / 'result.json'}, synthetic.parquet, synthetic.png")
    return 0


def cmd_pretrain(args) -> int:
    cfg = _config(args)
    if not cfg.pool.archs:
        from .config import ConfigError

        raise ConfigError("pool.archs: empty, nothing to pretrain")
    from .pipeline import run_pretrain

    pool = run_pretrain(cfg, progress=not args.quiet)
    for row in pool.manifest():
        train = "" if row["train_accuracy"] is None else f"  train acc {100 * row['train_accuracy']:.2f}%"
        print(f"{row['id']}  test acc {100 * row['test_accuracy']:.2f}%{train}")
    print(f"{len(pool.ptms)} PTMs in {cfg.store}: {pool.trainings} trained, {pool.hits} reused")
    return 0


def cmd_evaluate(args) -> int:
    from .artifacts import read_synthetic, write_json
    from .config import load_config
    from .pipeline import run_evaluate

    images, labels, meta = read_synthetic(args.synthetic)
    cfg = load_config(args.config, args.set, base=None if args.config else meta.get("config"))
    result = run_evaluate(cfg, images, labels, progress=not args.quiet)
    print(f"{'eval arch':<16}{'synthetic':>20}{'random real':>20}")
    print("\n".join(_accuracy_rows(result)))
    if args.out:
        write_json(args.out, result)
    return 0


def cmd_study(args) -> int:
    from .study_spec import load_study

    study = load_study(args.study, args.set)  # checked before torch, Ray and MLflow are imported
    trials = getattr(args, "trials", 0)
    if trials and not study.spec.search:
        from .config import ConfigError

        raise ConfigError("search: the study file has no search space")
    from .study import run_study
    from .tracking import redact

    summary = run_study(study, address=args.address, mlflow_uri=args.mlflow_uri, store=args.store,
                        results=args.results, resume=getattr(args, "resume", False), search_trials=trials,
                        optuna_storage=getattr(args, "optuna_storage", None), prune=getattr(args, "prune", False),
                        select_on_test=getattr(args, "select_on_test", False), quiet=args.quiet)
    pruned = sum(bool(r.get("pruned")) for r in summary["trials"])
    print(f"study {study.spec.name}: {len(summary['trials'])} trials, {summary['errors']} failed, {pruned} pruned; "
          f"MLflow {redact(summary['tracking_uri'])} (parent run {summary['parent_run_id']})")
    print(closing_table(summary["trials"], study.spec.metric))
    print(verdict_lines(summary, study.spec.name))
    print(ui_lines(summary))
    return 1 if summary["errors"] else 0


def closing_table(trials: list[dict], metric: str) -> str:
    """One row per grid point: its samples' study metric, test accuracy and random real, mean ± std."""
    from .report import pm
    from .study_spec import run_name

    groups: dict[str, list[dict]] = {}
    for t in trials:
        groups.setdefault(json.dumps(t["overrides"], sort_keys=True, default=str), []).append(t)

    def cell(rows: list[dict], key: str) -> str:
        values = [r[key] for r in rows if isinstance(r.get(key), float) and not r.get("pruned")]
        if not values:
            return "pruned" if any(r.get("pruned") for r in rows) else "-"
        return pm(values)

    names = {k: run_name(json.loads(k), "").strip() for k in groups}
    width = max([len("point"), *map(len, names.values())])
    lines = [f"{'point':<{width}}  {'n':>2}  {metric:>16}  {'test acc.':>16}  {'random real':>16}"]
    for k, rows in groups.items():
        lines.append(f"{names[k]:<{width}}  {len(rows):>2}  {cell(rows, metric):>16}  {cell(rows, 'acc.mean'):>16}  "
                     f"{cell(rows, 'baseline.random.mean'):>16}")
    return "\n".join(lines)


def verdict_lines(summary: dict, study: str) -> str:
    """The study's claims with their verdicts, read back from MLflow like ``ptmdd report``."""
    from .report import findings

    try:
        found = findings(summary["tracking_uri"], study, summary["parent_run_id"])
    except Exception as e:  # noqa: BLE001 - MLflow away: the report can be made later
        return f"claims: not read back ({type(e).__name__})"
    return "\n".join(f"claim: {f['claim']}: {f['verdict']} (n={f['test']['n'] if f['test'] else len(f['acc'])}"
                     + (f", p={f['test']['p']:.3g}, Holm over {f['family']}: {f['p_holm']:.3g})" if f["test"] else ")")
                     for f in found)


def ui_lines(summary: dict) -> str:
    """Where to look: the MLflow UI on this experiment's runs (the model-training view)."""
    from .tracking import ui_command, ui_url

    if summary.get("experiment_id") is None:
        return ""
    cmd = ui_command(summary["tracking_uri"])
    return "\n".join(([f"open the MLflow UI:  {cmd}"] if cmd else []) +
                     [f"runs of this study:  {ui_url(summary['tracking_uri'], summary['experiment_id'])}"])


def cmd_report(args) -> int:
    from .report import write_report

    if args.from_file:
        md = write_report(None, "", args.out, rows_file=args.from_file, optuna_storage=args.optuna_storage)
        print(f"wrote {md} (and plots beside it) from {', '.join(args.from_file)}")
        return 0
    uri, name = _study_source(args)
    md = write_report(uri, name, args.out, run_id=args.run_id, kind=args.kind, optuna_storage=args.optuna_storage)
    print(f"wrote {md} (and plots beside it); logged to the study's parent run")
    return 0


def cmd_rows(args) -> int:
    from .rows import from_mlflow, write_rows

    uri, name = _study_source(args)
    run = from_mlflow(uri, name, args.run_id, args.kind)
    path = write_rows(run, args.out)
    print(f"wrote {len(run.rows)} trial rows of {name} (parent run {run.run_id}) to {path}")
    return 0


def _study_source(args) -> tuple[str, str]:
    """(tracking URI, study name) of ``report``/``rows``: the study named or read from its YAML,
    in ``--mlflow-uri`` or the results directory's SQLite; ``--sync`` first logs what a study
    could not while MLflow was away."""
    from .config import ConfigError
    from .tracking import default_tracking_uri

    name = args.study
    if not name:
        raise ConfigError("study: name the study (or its YAML), or give --from FILE")
    if name.endswith((".yaml", ".yml")):
        from .study_spec import load_study

        name = load_study(name).spec.name
    uri = args.mlflow_uri or default_tracking_uri(args.results)
    if getattr(args, "sync", False):
        from .tracking import check_reachable, sync_pending

        check_reachable(uri)
        print(f"synced {sync_pending(uri, Path(args.results).resolve())} trial run(s) logged while MLflow was away")
    return uri, name


def _shown(value) -> str:
    """A value as ``--set`` and YAML take it back: strings bare, everything else as JSON (null, true, [])."""
    return value if isinstance(value, str) else json.dumps(value)


def config_table(rows: list[dict]) -> str:
    """``ptmdd config``'s text form: one aligned line per key, ``key  default  meaning``."""
    key_w = max(len(r["key"]) for r in rows)
    value_w = max(len(_shown(r["default"])) for r in rows)
    lines = [f"{'key':<{key_w}}  {'default':<{value_w}}  meaning"]
    lines += [f"{r['key']:<{key_w}}  {_shown(r['default']):<{value_w}}  {r['help']}" for r in rows]
    return "\n".join(lines)


def cmd_config(args) -> int:
    from .config import build_config, describe

    cfg = build_config({"distill": {"method": args.method}}) if args.method else None
    rows = describe(cfg)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(config_table(rows))
    if args.method:
        print(f"\nresolved for distill.method={args.method}: "
              f"what `ptmdd distill --set distill.method={args.method}` runs")
    else:
        print("\nnull: see the meaning; `ptmdd config --method dc|dsa|dm` shows what a method resolves it to")
    return 0


def cmd_store(args) -> int:
    from .store import CheckpointStore

    store = CheckpointStore(args.store)
    store.check()  # an unreachable S3 endpoint, a missing bucket, bad credentials: one line, exit 1
    if args.action == "ls":
        rows = store.ls()
        if args.json:
            print(json.dumps(rows, indent=1))
        for m in rows if not args.json else []:
            train = f"  train acc {100 * float(m['train_accuracy']):.2f}%" if "train_accuracy" in m else ""
            print(f"{m['key']}  test acc {100 * float(m.get('test_accuracy', 0)):.2f}%{train}  {m.get('bytes', 0)} B")
    elif args.action == "stats":
        _print_store_stats(store, args.json)
    else:
        removed = store.gc()
        print(json.dumps(removed) if args.json else "removed " + ", ".join(f"{v} {k}" for k, v in removed.items()))
    return 0


def _print_store_stats(store, as_json: bool) -> None:
    """``ptmdd store stats``: the totals, then what each PTM cost to train and takes up."""
    from .pool import store_stats

    stats = store_stats(store)
    if as_json:
        print(json.dumps(stats))
        return
    print("  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items() if k != "ptms"))
    for r in stats["ptms"]:
        secs = "cost unknown" if r["train_wall_s"] is None else \
            f"{r['train_wall_s']:.1f} s wall, {r['train_cpu_s']:.1f} s CPU"
        print(f"{r['key']}  {secs}  {r['bytes']} B")


def _example(command: str) -> str:
    """The epilog of a ``--help``: one real command line, with files that ship in the repository."""
    return f"example:\n  {command}"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ptmdd", description="PTM-guided dataset distillation (DC, DSA, DM + CLoM/CCLoM)",
                formatter_class=_Help, epilog=_example("ptmdd study studies/quickstart.yaml && "
                                                       "ptmdd report quickstart --out runs/report"))
    p.add_argument("--version", action="version", version=f"ptmdd_ray {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run_commands(sub)
    _add_study_commands(sub)
    _add_report_command(sub)
    _add_store_and_config_commands(sub)
    return p


def _command(sub, name: str, summary: str, example: str, func):
    """A subcommand whose ``--help`` gives its summary, its options' defaults and an example."""
    sp = sub.add_parser(name, help=summary, description=summary, epilog=_example(example), formatter_class=_Help)
    sp.set_defaults(func=func)
    return sp


def _common(sp, config_positional: bool = True) -> None:
    """The options of the commands that build one core config: the file, ``--set``, quiet, verbose."""
    if config_positional:
        sp.add_argument("config", nargs="?", help="YAML config (default: embedded digits defaults)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a dotted config key, e.g. distill.ipc=1 (repeatable; `ptmdd config` "
                    "lists the keys)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_run_commands(sub) -> None:
    """``distill``, ``pretrain`` and ``evaluate``: one config, run here."""
    d = _command(sub, "distill", "pretrain-if-needed, distill, evaluate",
                 "ptmdd distill studies/digits.yaml --out runs/digits", cmd_distill)
    _common(d)
    d.add_argument("--out", required=True, help="output directory")

    t = _command(sub, "pretrain", "build or extend the PTM pool of a config", "ptmdd pretrain studies/digits.yaml",
                 cmd_pretrain)
    _common(t)

    e = _command(sub, "evaluate", "evaluate a saved synthetic.parquet",
                 "ptmdd evaluate runs/digits/synthetic.parquet --set eval.runs=5 --out runs/digits/eval.json",
                 cmd_evaluate)
    e.add_argument("synthetic", help="synthetic.parquet written by ptmdd distill")
    e.add_argument("--config", help="config for dataset/eval (default: the one stored in the file)")
    _common(e, config_positional=False)
    e.add_argument("--out", help="write the evaluation result as JSON here (default: only printed)")


def _study_args(sp) -> None:
    """The options ``study`` and ``search`` share: the study file, where it runs and records."""
    sp.add_argument("study", help="study YAML (name, base, sweep, search, samples, resources, ...)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a study key, e.g. base.distill.iterations=50 or samples=3")
    sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    sp.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite in --results)")
    sp.add_argument("--store", help="PTM checkpoint store location (default: the config's store)")
    sp.add_argument("--results", default="runs/studies", help="where Ray Tune keeps the experiment: a "
                    "directory, or on a cluster a URI every node reaches (s3://BUCKET/PREFIX; needs --mlflow-uri)")
    sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sp.add_argument("-q", "--quiet", action="store_true", help="print only the closing table (no Tune "
                    "progress, warnings only)")


def _add_study_commands(sub) -> None:
    """``study`` (the grid) and ``search`` (Optuna over the search space), both on Ray Tune."""
    st = _command(sub, "study", "run a study's sweep (Ray Tune, MLflow tracking)",
                  "ptmdd study studies/quickstart.yaml", cmd_study)
    _study_args(st)
    st.add_argument("--resume", action="store_true", help="finish an interrupted study")
    se = _command(sub, "search", "Optuna TPE over a study's search space, as Ray Tune trials",
                  "ptmdd search studies/quickstart.yaml --trials 8", cmd_study)
    _study_args(se)
    se.add_argument("--trials", type=int, required=True, help="number of trials to run in this call")
    se.add_argument("--optuna-storage", help="Optuna storage URL (default: sqlite in --results); the "
                    "Optuna study is named after the study, so a second call continues it")
    se.add_argument("--prune", action="store_true", help="stop trailing trials early (ASHA) on the intermediate "
                    "evaluations every base.eval.every iterations; Optuna records them as PRUNED")
    se.add_argument("--select-on-test", action="store_true", help="allow a test metric (acc.mean) to choose; "
                    "the run is tagged and its report says so (default: only validation metrics choose)")


def _add_report_command(sub) -> None:
    r = _command(sub, "report", "tables and plots of a study's runs, read back from MLflow or a rows file",
                 "ptmdd report quickstart --out runs/report", cmd_report)
    _study_source_args(r)
    r.add_argument("--out", required=True, help="directory for report.md and the PNG plots")
    r.add_argument("--from", dest="from_file", metavar="FILE", action="append", help="read the trials from a rows "
                   "file (`ptmdd rows`, e.g. bench/repro/rows/*.parquet) instead of MLflow; nothing is logged. Given "
                   "more than once: one study's invocations (an extension with other seeds), paired by seed")
    r.add_argument("--sync", action="store_true", help="first log the trials that finished while the MLflow "
                   "server was unreachable (from their result.json under --results)")
    r.add_argument("--optuna-storage", help="a search's Optuna storage URL, for its importances, history and "
                   "Pareto front (default: the one its parent run names; needed when that has a password)")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    w = _command(sub, "rows", "write a study's per-trial rows (grid point, seed, accuracies per evaluation model, "
                 "baseline, timings, commit) to one Parquet file", "ptmdd rows quickstart --out quickstart.parquet",
                 cmd_rows)
    _study_source_args(w)
    w.add_argument("--out", required=True, help="the Parquet file to write (replaced whole)")
    w.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _study_source_args(sp) -> None:
    sp.add_argument("study", nargs="?", help="study name (the MLflow experiment) or study YAML")
    sp.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite in --results)")
    sp.add_argument("--results", default="runs/studies", help="results directory of the study")
    sp.add_argument("--kind", choices=["study", "search"], default="study", help="the latest run of "
                    "`ptmdd study` (default) or of `ptmdd search` (its trials ranked by the search metric)")
    sp.add_argument("--run-id", help="this parent run instead of the latest one")


def _add_store_and_config_commands(sub) -> None:
    s = _command(sub, "store", "inspect or clean a PTM checkpoint store", "ptmdd store stats --json", cmd_store)
    s.add_argument("action", choices=["ls", "stats", "gc"], help="list checkpoints, life-time counts, or "
                   "remove temporaries, orphans and corrupt checkpoints")
    s.add_argument("--store", default="ptm_store", help="store directory or pyarrow.fs URI (default: ptm_store)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    c = _command(sub, "config", "every config key (for --set, sweeps and searches) with its default and meaning",
                 "ptmdd config --method dc", cmd_config)
    c.add_argument("--method", choices=METHODS, help="the defaults this method resolves them to (default: the "
                   "unresolved ones, null where the method decides)")
    c.add_argument("--json", action="store_true",
                   help="machine-readable output: a list of {key, default, type, help}")
    c.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False) and args.func is cmd_study
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "botocore"):  # botocore says where it found credentials at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .errors import ConfigError, DivergenceError, IntegrityError, MemoryShortError, StoreError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"ptmdd: error: {e}", file=sys.stderr)
        return 2
    except (DivergenceError, IntegrityError, MemoryShortError, StoreError) as e:
        print(f"ptmdd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ptmdd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
