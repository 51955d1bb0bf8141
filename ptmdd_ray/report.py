"""``ptmdd report``: read a study's runs back from MLflow, tabulate and plot each swept axis.

For every swept key, the trials are grouped by that key's value (and by the values of the other
swept keys, so nothing is averaged over a confound); each group reports acc.mean as mean ± std over
its samples, with the random-real baseline beside it. A study with a ``matrix`` key also gets a
matrix: that key's values down, the combinations of the other swept keys across (Nm x Na for the
diversity study, PTM source x loss for the domain study). Tables go to ``report.md``, plots to
``acc_vs_<key>.png`` and ``matrix_<key>.png``, and all of them are logged to the study's parent run.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError
from .cost_report import cost_lines, pareto_plot, point_costs
from .rows import StudyRun, from_mlflow, merge_runs, read_rows
from .stats import ALPHA, holm, paired, t_interval, verdict
from .study_spec import BEST, label, matches, metric_split, run_name


def pm_of(mean: float, std: float) -> str:
    """An accuracy as ``mean ± std`` in %, two decimals: how every table (and the CLI) writes one."""
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def pm(values: list[float]) -> str:
    """``mean ± std`` (population std) of accuracies in %; ``-`` for none."""
    if not values:
        return "-"
    return pm_of(statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)


# ------------------------------------------------------------------ statistics


def _vs_plain(group, mine: dict[str, float], plain: dict[str, float], control: dict | None) -> str:
    """The group's paired difference from the plain method; the plain method's own row says so
    rather than testing it against itself."""
    if control is not None and all(r["point"] == control for r in group.members):
        return "the plain method"
    return _fmt_test(paired(mine, plain)) if plain else "-"


def per_sample(rows: list[dict[str, Any]], metric: str = "acc.mean") -> dict[str, float]:
    """{sample: mean of ``metric`` over the rows of that sample}."""
    by: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if metric in r["metrics"]:
            by[r["sample"]].append(r["metrics"][metric])
    return {k: statistics.fmean(v) for k, v in by.items()}


def _fmt_test(t: dict[str, Any] | None) -> str:
    if t is None:
        return "-"
    lo, hi = t["ci"] if t["ci"] else (float("nan"), float("nan"))
    return f"{100 * t['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}], p={t['p']:.3g}"


def choose(selector: dict[str, Any], rows: list[dict[str, Any]], metric: str,
           reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """``selector`` with every ``best`` value replaced by the value whose trials (matching the rest
    of the selector) have the highest mean ``metric`` over their samples: the study's validation
    metric, so a claim about "the best weight" is chosen on validation and then tested on test.
    The claim's ``reference`` point is not a candidate ("the best β" of "CCLoM beats β = 0")."""
    free = [k for k, v in selector.items() if v == BEST]
    if not free:
        return selector
    fixed = {k: v for k, v in selector.items() if v != BEST}
    scores: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if reference is not None and matches(r["point"], reference):
            continue
        if matches(r["point"], fixed) and all(k in r["point"] for k in free) and metric in r["metrics"]:
            scores[json.dumps({k: r["point"][k] for k in free}, sort_keys=True)].append(r["metrics"][metric])
    if not scores:
        return {**fixed, **{k: None for k in free}}
    best = max(scores, key=lambda k: statistics.fmean(scores[k]))
    return {**fixed, **json.loads(best)}


def claim_results(parent: StudyRun, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each claim of the study (parent tag ``ptmdd.claims``) tested on the finished trials' test
    accuracy; a ``best`` in a claim's selector is first chosen on the study's metric. The claims
    are the study's family of hypotheses: each gets its raw p and its Holm-adjusted ``p_holm``
    over the claims with a test, and the verdict reads ``p_holm``."""
    claims = json.loads(parent.tags.get("ptmdd.claims") or "[]")
    control = json.loads(parent.tags.get("ptmdd.control") or "null")
    metric = parent.tags.get("ptmdd.metric") or "acc.mean"
    out = []
    for c in claims:
        picked = {side: isinstance(c[side], dict) and BEST in c[side].values() for side in ("better", "than")}
        than = choose(c["than"], rows, metric) if isinstance(c["than"], dict) else c["than"]
        reference = control if than == "control" else than if isinstance(than, dict) else None
        c = {**c, "better": choose(c["better"], rows, metric, reference), "than": than}
        better = [r for r in rows if matches(r["point"], c["better"])]
        if c["than"] == "random":
            a, b = per_sample(better), per_sample(better, "baseline.random.mean")
            than = "random real images"
        else:
            sel = control if c["than"] == "control" else c["than"]
            a, b = per_sample(better), per_sample([r for r in rows if sel is not None and matches(r["point"], sel)
                                                   and (c["than"] != "control" or r["point"] == control)])
            than = "the plain method" if c["than"] == "control" else label(c["than"])
        chosen = f" (best on {metric})"
        out.append({"claim": c["claim"], "better": label(c["better"]) + chosen * picked["better"],
                    "than": than + chosen * picked["than"], "test": paired(a, b),
                    "acc": list(a.values()), "base": list(b.values())})
    adjusted = holm([f["test"]["p"] if f["test"] else None for f in out])
    tested = sum(p is not None for p in adjusted)
    for f, p in zip(out, adjusted):
        f.update(p_holm=p, family=tested, verdict=verdict(f["test"], ALPHA, p))
    return out


def _assignments(values: dict[str, str], keys: list[str]) -> str:
    """"k=v, ..." of ``keys``: how a table names a grid point or the other swept keys of a group."""
    return ", ".join(f"{k}={values[k]}" for k in keys)


def eval_archs(rows: list[dict[str, Any]]) -> list[str]:
    """The architectures the trials' sets were evaluated on (metrics ``acc.<arch>.mean``)."""
    seen: list[str] = []
    for r in rows:
        for k in r["metrics"]:
            if k.startswith("acc.") and k.endswith(".mean") and k.count(".") == 2 and k != "acc.mean":
                if k[4:-5] not in seen:
                    seen.append(k[4:-5])
    return seen


def arch_lines(swept: list[str], rows: list[dict[str, Any]], plain_rows: list[dict[str, Any]]) -> list[str]:
    """A table of every grid point's accuracy per evaluation architecture, each with its paired
    difference from the plain method on the same architecture (cross-architecture claims)."""
    archs = eval_archs(rows)
    if len(archs) < 2:
        return []
    points: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        points[_assignments(r["values"], swept) or "-"].append(r)
    lines = ["## Per evaluation architecture", "",
             "Accuracy (%) of each architecture trained from scratch on the sets, mean ± std over samples; "
             "below it the paired difference from the plain method on that architecture [95% CI], p.", "",
             "| point | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
    for name, members in sorted(points.items()):
        cells = []
        for a in archs:
            m = f"acc.{a}.mean"
            cell = pm([r["metrics"][m] for r in members if m in r["metrics"]])
            if plain_rows and members[0] not in plain_rows:
                cell += "<br>" + _fmt_test(paired(per_sample(members, m), per_sample(plain_rows, m)))
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    # the random real subset per architecture: the same for every point of a seed (mean over seeds)
    base = [per_sample(rows, f"baseline.random.{a}.mean") for a in archs]
    if any(base):
        lines.append("| random real | " + " | ".join(pm(list(b.values())) for b in base) + " |")
    return lines + [""]


@dataclass
class Group:
    """The trials sharing one value of an axis and one combination of the other swept keys."""

    value: str
    others: str  # "k=v, ..." of the other swept keys
    members: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accs(self) -> list[float]:
        return [r["metrics"]["acc.mean"] for r in self.members]

    @property
    def bases(self) -> list[float]:
        return [r["metrics"]["baseline.random.mean"] for r in self.members if "baseline.random.mean" in r["metrics"]]

    @property
    def vals(self) -> list[float]:
        return [r["metrics"]["val.acc.mean"] for r in self.members if "val.acc.mean" in r["metrics"]]


def tables(swept: list[str], rows: list[dict[str, Any]]) -> dict[str, list[Group]]:
    """{axis: [Group]} for every swept axis, sorted by the other values, then the axis value."""
    out = {}
    for axis in swept or ["(none)"]:
        groups: dict[tuple[str, str], Group] = {}
        for r in rows:
            value = r["values"].get(axis, "-")
            others = _assignments(r["values"], [k for k in swept if k != axis])
            groups.setdefault((others, value), Group(value, others)).members.append(r)
        out[axis] = [groups[k] for k in sorted(groups, key=lambda k: (k[0], _sort_key(k[1])))]
    return out


def _sort_key(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def matrix(groups: list[Group]) -> tuple[list[str], list[str], dict[tuple[str, str], list[float]]]:
    """(row values, column labels, {(row, column): accs}) from one axis's groups."""
    rows = sorted({g.value for g in groups}, key=_sort_key)
    cols = sorted({g.others for g in groups})
    return rows, cols, {(g.value, g.others): g.accs for g in groups}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _axis_plot(plt, study: str, axis: str, groups: list[Group], png: Path) -> None:
    """Accuracy against one swept key, a line per combination of the others: x in sorted order
    (numbers as numbers) on one shared axis, the legend beside the plot rather than on the data."""
    fig, ax = plt.subplots(figsize=(8, 4))
    by_other: dict[str, list] = defaultdict(list)
    for g in groups:
        by_other[g.others].append((g.value, g.accs, g.bases))
    ticks = sorted({g.value for g in groups}, key=_sort_key)
    for o, pts in by_other.items():
        pts = sorted(pts, key=lambda p: _sort_key(p[0]))
        xs = [ticks.index(p[0]) for p in pts]
        ax.errorbar(xs, [100 * statistics.fmean(p[1]) for p in pts],
                    yerr=[100 * (statistics.pstdev(p[1]) if len(p[1]) > 1 else 0) for p in pts],
                    marker="o", capsize=3, label=o or "synthetic")
        if all(p[2] for p in pts):
            ax.plot(xs, [100 * statistics.fmean(p[2]) for p in pts], "k--", alpha=0.5)
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlabel(axis)
    ax.set_ylabel("test accuracy (%)  [dashed: random real]")
    ax.set_title(f"{study}: accuracy vs {axis}")
    if len(by_other) > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _matrix_plot(plt, study: str, axis: str, groups: list[Group], png: Path) -> None:
    import numpy as np

    rows, cols, cells = matrix(groups)
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), accs in cells.items():
        grid[rows.index(r), cols.index(c)] = 100 * statistics.fmean(accs)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(cols), 1.2 + 0.6 * len(rows)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for (r, c), accs in cells.items():
        ax.text(cols.index(c), rows.index(r), pm(accs), ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(cols)), [c.replace(", ", "\n") or "-" for c in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_ylabel(axis)
    ax.set_title(f"{study}: accuracy (%) by {axis}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def selection_lines(parent, rows: list[dict[str, Any]] = ()) -> list[str]:
    """What the study chose on (its metric, with a warning when that was test accuracy) and the
    grid point it chose, with that point's test accuracy: the figure to quote."""
    metric = parent.tags.get("ptmdd.metric") or "acc.mean"
    if parent.tags.get("ptmdd.select_on_test") == "true":
        lines = [f"**Selected on test accuracy** (`{metric}`, `--select-on-test`): the chosen points' test "
                 "accuracy is optimistically biased; it is not a fair estimate."]
    elif metric_split(metric) == "val":
        lines = [f"Choices (the best point, claims on `best`) are made on `{metric}`, the validation split held out "
                 "of training; the accuracies reported are on the test split."]
    else:
        return []
    by_point: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if metric in r["metrics"]:
            by_point[json.dumps(r["point"], sort_keys=True, default=str)].append(r)
    if by_point:
        best = max(by_point, key=lambda k: statistics.fmean(r["metrics"][metric] for r in by_point[k]))
        members = by_point[best]
        lines.append(f"Best point on `{metric}`: {label(json.loads(best)) or '(base)'}, "
                     f"{pm([r['metrics'][metric] for r in members])} on it; test accuracy "
                     f"{pm([r['metrics']['acc.mean'] for r in members if 'acc.mean' in r['metrics']])} "
                     f"({len(members)} samples).")
    return lines + [""]


def case_lines(cases: list[dict[str, Any]], rows: list[dict[str, Any]], plain: dict[str, float],
               control: dict | None) -> list[str]:
    """A ``cases`` study's table: a row per case, in the study's order, labelled by what it changes."""
    lines = ["## Cases", "", "| case | n | val acc. | synthetic acc. | random real | vs random real | vs plain method |",
             "|---|---|---|---|---|---|---|"]
    for case in cases:
        members = [r for r in rows if set(r["point"]) == set(case) and matches(r["point"], case)]
        g = Group(run_name(case, "").strip(), "", members)
        if not g.members:
            continue
        mine = per_sample(g.members)
        lines.append(f"| {g.value} | {len(g.members)} | {pm(g.vals) if g.vals else '-'} | {pm(g.accs)} | "
                     f"{pm(g.bases)} | {_fmt_test(paired(mine, per_sample(g.members, 'baseline.random.mean')))} | "
                     f"{_vs_plain(g, mine, plain, control)} |")
    return lines + [""]


def search_lines(parent, rows: list[dict[str, Any]], swept: list[str]) -> list[str]:
    """A search's trials ranked by its metric, best first, and the best trial's values."""
    metric = parent.tags.get("ptmdd.metric") or "acc.mean"
    ranked = sorted((r for r in rows if metric in r["metrics"]), key=lambda r: -r["metrics"][metric])
    if not ranked:
        return []
    best = ranked[0]
    lines = ["## Search", "", "Best trial (Optuna's best params): " + ", ".join(
        f"`{k}` = {best['params'].get(k, '-')}" for k in swept) + f"; {metric} {100 * best['metrics'][metric]:.2f}, "
        f"test {100 * best['metrics'].get('acc.mean', float('nan')):.2f}.", "",
        "| rank | " + " | ".join(swept) + f" | {metric} | test acc. |", "|---|" + "---|" * (len(swept) + 2)]
    for i, r in enumerate(ranked, 1):
        lines.append(f"| {i} | " + " | ".join(r["params"].get(k, "-") for k in swept) +
                     f" | {100 * r['metrics'][metric]:.2f} | {100 * r['metrics'].get('acc.mean', float('nan')):.2f} |")
    return lines + [""]


def findings(tracking_uri: str, study: str, run_id: str | None = None) -> list[dict[str, Any]]:
    """The claims of a study run with their paired tests and verdicts (what ``report.md`` lists)."""
    run = from_mlflow(tracking_uri, study, run_id)
    return claim_results(run, run.rows)


def write_report(tracking_uri: str | None, study: str, out: str | Path, run_id: str | None = None,
                 kind: str = "study", rows_file: str | Path | list | None = None,
                 run: StudyRun | None = None, optuna_storage: str | None = None) -> Path:
    """``report.md`` and its plots in ``out`` for the study's latest parent run of ``kind`` (or
    ``run_id``, or ``run`` as already read from MLflow), each also logged to that run under
    ``report/``; with ``rows_file``, from that file of per-trial rows (``ptmdd rows``) instead,
    or from several (one study's invocations, merged by seed), and logged nowhere. A search's
    report also reads its Optuna study (:mod:`ptmdd_ray.search_report`) from ``optuna_storage``,
    by default the storage its parent run names."""
    files = [rows_file] if isinstance(rows_file, (str, Path)) else list(rows_file or [])
    if run is None:
        run = merge_runs([read_rows(f) for f in files], [str(f) for f in files]) if files else \
            from_mlflow(tracking_uri, study, run_id, kind)
    if not run.rows:
        raise ConfigError(f"study: the latest run of {study!r} has no finished trials" if not files
                          else f"from: {', '.join(map(str, files))} holds no trials")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, pngs = _write_files(run, study or run.study, out, files, optuna_storage)
    if not files:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri)
        for f in [md, *pngs]:
            client.log_artifact(run.run_id, str(f), artifact_path="report")
    return md


def _write_files(parent: StudyRun, study: str, out: Path, rows_files: list,
                 optuna_storage: str | None = None) -> tuple[Path, list[Path]]:
    """``report.md`` and the PNGs it shows, in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept, rows = parent.swept, parent.rows
    lines = _header_lines(study, parent, rows, swept, rows_files) + findings_lines(claim_results(parent, rows))
    control = json.loads(parent.tags.get("ptmdd.control") or "null")
    plain_rows = [r for r in rows if control is not None and r["point"] == control]
    plain = per_sample(plain_rows)
    lines += arch_lines(swept, rows, plain_rows)
    if parent.tags.get("ptmdd.control_added") == "true":
        rows = [r for r in rows if r["point"] != control]
        lines += [f"Plain method ({label(control)}): {pm(list(plain.values()))} over {len(plain)} samples.", ""]
    cases = json.loads(parent.tags.get("ptmdd.cases") or "[]")
    axes = [k for k in swept if not any(k in c for c in cases)]
    if cases and not axes:  # a study of cases alone: one table, a row per case
        lines += case_lines(cases, rows, plain, control)
        swept = []
    by_axis = tables(swept, rows) if swept or not cases else {}
    files = []
    for axis, groups in by_axis.items():
        png = out / f"acc_vs_{_safe(axis)}.png"
        _axis_plot(plt, study, axis, groups, png)
        lines += axis_lines(axis, groups, plain, control) + [f"![accuracy vs {axis}]({png.name})", ""]
        files.append(png)
    key = parent.tags.get("ptmdd.matrix") or ""
    if key in by_axis:
        png = out / f"matrix_{_safe(key)}.png"
        _matrix_plot(plt, study, key, by_axis[key], png)
        lines += matrix_lines(key, by_axis[key]) + ["", f"![matrix]({png.name})", ""]
        files.append(png)
    lines += _cost_section(plt, study, parent.rows, control, out, files)
    if parent.tags.get("ptmdd.kind") == "search":
        lines += _optuna_section(parent, optuna_storage, out, files)
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md, files


def _cost_section(plt, study: str, rows: list[dict[str, Any]], control: dict | None, out: Path,
                  files: list[Path]) -> list[str]:
    """The cost table (:mod:`ptmdd_ray.cost_report`) and, when any point has a cost, its Pareto plot."""
    costs = point_costs(rows)
    lines = cost_lines(costs, control)
    png = out / "cost_pareto.png"
    if lines and pareto_plot(plt, study, costs, png):
        lines += [f"![accuracy against cost]({png.name})", ""]
        files.append(png)
    return lines


def _optuna_section(parent: StudyRun, storage: str | None, out: Path, files: list[Path]) -> list[str]:
    """A search's importances, history, parallel coordinates and Pareto front, from its Optuna
    study; a line saying why not when its storage cannot be read."""
    from .search_report import Objectives, search_section

    storage = storage or parent.tags.get("ptmdd.optuna_storage")
    if not storage or "***" in storage:
        why = "its storage is not recorded" if not storage else f"its storage ({storage}) needs a password"
        return ["## Optuna study", "", f"Not read: {why}; give `ptmdd report --kind search --optuna-storage URL`.", ""]
    pairs = json.loads(parent.tags.get("ptmdd.objectives") or "null") or \
        [[parent.tags.get("ptmdd.metric") or "val.acc.mean", "max"]]
    lines, pngs = search_section(storage, parent.study, Objectives(tuple(map(tuple, pairs))), out)
    files += pngs
    return lines


def _header_lines(study: str, parent: StudyRun, rows: list[dict[str, Any]], swept: list[str],
                  rows_files: list = ()) -> list[str]:
    """The report's title, where its rows come from, how to read its figures, its design (sample
    size, evaluation against the reference's), what it chose on and (a search) its ranking."""
    names = ", ".join(f"`{Path(f).name}`" for f in rows_files)
    source = f"rows file{'s' * (len(rows_files) > 1)} {names} (parent run `{parent.run_id}`)" if rows_files \
        else f"MLflow parent run `{parent.run_id}`"
    commits = sorted({r.get("commit", "unknown")[:12] for r in rows})
    lines = [f"# Study `{study}`", "", f"{source}, {len(rows)} finished trials, code at commit "
             f"{', '.join(f'`{c}`' for c in commits)}. "
             "Accuracy in %, mean ± std over samples (each sample a full distillation with its own seed); "
             "95% t-intervals; differences are paired by sample (same seed) with a two-sided paired t-test.", ""]
    lines += design_lines(parent, rows) + protocol_lines(rows) + selection_lines(parent, rows)
    if parent.tags.get("ptmdd.kind") == "search":
        lines += search_lines(parent, rows, swept)
    return lines


def design_lines(parent: StudyRun, rows: list[dict[str, Any]]) -> list[str]:
    """The sample size the study file fixed before it ran, and the points that finished fewer
    (a study grows in every point or not at all: a point with more samples than the rest says so)."""
    if parent.tags.get("ptmdd.kind") == "search":
        return []
    fixed = parent.tags.get("ptmdd.samples")
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[json.dumps(r["point"], sort_keys=True, default=str)] += 1
    if not fixed:
        return [f"Sample size: not recorded by this run; {', '.join(sorted({str(n) for n in counts.values()}))} "
                "finished samples per point.", ""]
    line = f"Sample size: {fixed} samples (seeds) per point, fixed in the study file before it ran"
    invocations = json.loads(parent.tags.get("ptmdd.invocations") or "[]")
    if invocations:  # merged rows files: the study was extended, and every point with it
        line += (f", in {len(invocations)} invocations ({' + '.join(str(i['samples']) for i in invocations)} "
                 "samples: the study was extended in every point)")
    off = {k: n for k, n in counts.items() if n != int(fixed)}
    if not off:
        return [line + f"; all {len(counts)} points finished all of them.", ""]
    return [line + "; points with another count (unfinished or failed trials): " + ", ".join(
        f"{label(json.loads(k)) or 'base'} n={n}" for k, n in sorted(off.items())) + ".", ""]


def protocol_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The evaluation the trials used, beside the reference's (``evaluate_synset``: DC 300 epochs,
    DSA and DM 1000, 5 models per architecture); a shortened one is said to be so."""
    from .config import METHOD_DEFAULTS, REFERENCE_EVAL_RUNS

    used = sorted({(r["params"].get("distill.method", "?"), r["params"].get("eval.runs", "?"),
                    r["params"].get("eval.epochs", "?")) for r in rows})
    lines = []
    for method, runs, epochs in used:
        ref = METHOD_DEFAULTS.get(method, {}).get("eval_epochs")
        if ref is None:
            continue
        same = str(runs) == str(REFERENCE_EVAL_RUNS) and str(epochs) == str(ref)
        lines.append(f"Evaluation ({method.upper()}): {runs} models × {epochs} epochs per architecture; the reference: "
                     f"{REFERENCE_EVAL_RUNS} × {ref}" + ("." if same else " (shortened here, for CPU scale)."))
    return lines + [""] if lines else []


def findings_lines(found: list[dict[str, Any]]) -> list[str]:
    """The claims' table (see :func:`claim_results`): raw and Holm-adjusted p, the verdict on the
    adjusted one; nothing when the study makes none."""
    if not found:
        return []
    family = found[0]["family"]
    lines = ["## Findings", "",
             f"The study's {len(found)} claims are one family: each p-value is Holm-adjusted over the {family} "
             f"tested, and a verdict is significant at family level {ALPHA} (adjusted p < {ALPHA}).", "",
             "| claim | better | than | n | acc. | than acc. | difference [95% CI], p | p (Holm) | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in found:
        n = f["test"]["n"] if f["test"] else len(f["acc"])
        adj = f"{f['p_holm']:.3g}" if f["p_holm"] is not None else "-"
        lines.append(f"| {f['claim']} | {f['better']} | {f['than']} | {n} | {pm(f['acc'])} | {pm(f['base'])} | "
                     f"{_fmt_test(f['test'])} | {adj} | **{f['verdict']}** |")
    return lines + [""]


def axis_lines(axis: str, groups: list[Group], plain: dict[str, float], control: dict | None) -> list[str]:
    """One swept key's table: a row per group, with its random-real and plain-method comparisons."""
    lines = [f"## {axis}", "", f"| {axis} | other swept keys | n | val acc. | synthetic acc. | 95% CI | "
             "random real | vs random real | vs plain method |", "|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        mine = per_sample(g.members)
        ci = t_interval(g.accs)
        lines.append(f"| {g.value} | {g.others or '-'} | {len(g.members)} | {pm(g.vals) if g.vals else '-'} | "
                     f"{pm(g.accs)} | "
                     f"{f'{100 * ci[0]:.2f}–{100 * ci[1]:.2f}' if ci else '-'} | {pm(g.bases)} | "
                     f"{_fmt_test(paired(mine, per_sample(g.members, 'baseline.random.mean')))} | "
                     f"{_vs_plain(g, mine, plain, control)} |")
    return lines + [""]


def matrix_lines(key: str, groups: list[Group]) -> list[str]:
    """The ``matrix`` key's table: its values down, the other swept keys' combinations across."""
    rws, cols, cells = matrix(groups)
    lines = [f"## Matrix: {key} x other swept keys", "", f"| {key} | " + " | ".join(c or "-" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    return lines + [f"| {r} | " + " | ".join(pm(cells.get((r, c), [])) for c in cols) + " |" for r in rws]
