"""What each point of a study cost, and what it bought: the report's cost table (mean over
samples), guidance overhead against the plain method, and the Pareto front of test accuracy
against cost (the trials' ``cost.*`` metrics, see :mod:`ptmdd_ray.cost`).

Trials recorded before cost accounting have no ``cost.*``: their distillation and evaluation
seconds are read from ``distill.seconds`` / ``eval.seconds`` instead and the pool's price is
unknown ("-"), never a 0.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .study_spec import label


@dataclass
class PointCost:
    """One point's trials, what they scored and what they cost (wall seconds, mean over samples;
    None where no trial of the point recorded it)."""

    point: dict[str, Any]
    n: int
    accs: list[float]
    distill: float | None  # guide + distillation
    eval: float | None  # the set's evaluation
    baseline: float | None  # the random-real baseline's evaluation (0 when read back)
    pool_alone: float | None  # the pool's training, had this point been its only user
    pool_amortised: float | None  # its share of the study's PTM trainings
    total: float | None  # cost.seconds: all told, the pool amortised
    cpu: float | None  # CPU seconds all told (pool amortised)
    peak_rss_mb: float | None

    @property
    def name(self) -> str:
        return label(self.point) or "(base)"

    @property
    def acc(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def spent(self) -> float | None:
        """The x of the Pareto plot: ``total``, or (old trials) distillation + evaluation."""
        if self.total is not None:
            return self.total
        parts = [self.distill, self.eval, self.baseline]
        return None if self.distill is None else sum(p or 0.0 for p in parts)


def _mean(rows: list[dict[str, Any]], *keys: str) -> float | None:
    """Mean over the rows of the sum of ``keys`` (a row lacking one is left out); None if none has all."""
    vals = [sum(r["metrics"][k] for k in keys) for r in rows if all(k in r["metrics"] for k in keys)]
    return statistics.fmean(vals) if vals else None


def _either(rows: list[dict[str, Any]], new: tuple[str, ...], old: tuple[str, ...]) -> float | None:
    found = _mean(rows, *new)
    return found if found is not None else _mean(rows, *old)


def point_costs(rows: list[dict[str, Any]]) -> list[PointCost]:
    """A :class:`PointCost` per point with a test accuracy, in :func:`_order` (the same whether the
    rows come from MLflow or a rows file)."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if "acc.mean" in r["metrics"]:
            by[json.dumps(r["point"], sort_keys=True, default=str)].append(r)
    cpu_keys = tuple(f"cost.{k}.cpu_s" for k in ("guide", "distill", "eval", "baseline", "pool_amortised"))
    return [PointCost(
        point=json.loads(k), n=len(rs), accs=[r["metrics"]["acc.mean"] for r in rs],
        distill=_either(rs, ("cost.guide.wall_s", "cost.distill.wall_s"), ("distill.seconds",)),
        eval=_either(rs, ("cost.eval.wall_s",), ("eval.seconds",)),
        baseline=_mean(rs, "cost.baseline.wall_s"),
        pool_alone=_mean(rs, "cost.pool.wall_s"), pool_amortised=_mean(rs, "cost.pool_amortised.wall_s"),
        total=_mean(rs, "cost.seconds"), cpu=_mean(rs, *cpu_keys), peak_rss_mb=_mean(rs, "cost.peak_rss_mb"))
        for k, rs in sorted(by.items(), key=lambda kv: _order(json.loads(kv[0])))]


def _order(point: dict[str, Any]) -> tuple:
    """Points in key order, numbers as numbers (pool.epoch 2 before 10), whatever the rows' order."""
    def value(v: Any) -> tuple:
        return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, json.dumps(v))
    return tuple((k, value(v)) for k, v in sorted(point.items()))


def pareto_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the (cost, accuracy) points no other point beats: none costs no more and scores
    at least as well, and is strictly better in one of the two."""
    front = set()
    for i, (c, a) in enumerate(points):
        if not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i):
            front.add(i)
    return front


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _plus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def cost_lines(costs: list[PointCost], control: dict | None) -> list[str]:
    """The report's "Cost" section: a row per point, its guidance overhead against the plain
    method (``control``): the extra seconds of guided distillation, then with the pool's training
    amortised over the study's trials, then the pool paid in full by this point alone."""
    if not costs:
        return []
    plain = next((c for c in costs if control is not None and c.point == control), None)
    unknown = any(c.total is None for c in costs)
    lines = ["## Cost", "",
             "Wall seconds per trial, mean over samples (`cost.*`; CPU seconds count every thread). "
             "*Pool, alone*: training its PTMs up to their epoch, had this point been their only user; "
             "*amortised*: divided by the number of the study's trials that share each PTM. "
             "*Guidance overhead*: extra seconds against the plain method: distillation, then + the pool amortised, "
             "then + the pool alone. *All told*: distillation + evaluation + baseline + pool amortised."
             + (" Trials recorded before cost accounting have no `cost.*`: their distill and eval columns are "
                "`distill.seconds` and `eval.seconds` (the latter with the baseline in it), and `-` where they "
                "have no figure." if unknown else ""), "",
             "| # | point | n | test acc. | distill (s) | eval (s) | baseline (s) | pool, alone (s) | pool, amortised (s) | "
             "all told (s) | CPU all told (s) | peak RSS (MiB) | guidance overhead (s): distill / + amortised / "
             "+ alone |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, c in enumerate(costs, 1):
        if plain is None or c is plain or c.distill is None or plain.distill is None:
            over = "the plain method" if c is plain else "-"
        else:
            extra = c.distill - plain.distill
            over = f"{extra:+.1f} / {_s(_plus(extra, c.pool_amortised))} / {_s(_plus(extra, c.pool_alone))}"
        lines.append(f"| {i} | {c.name} | {c.n} | {100 * c.acc:.2f} | {_s(c.distill)} | {_s(c.eval)} | {_s(c.baseline)} | "
                     f"{_s(c.pool_alone)} | {_s(c.pool_amortised)} | {_s(c.total)} | {_s(c.cpu)} | "
                     f"{_s(c.peak_rss_mb)} | {over} |")
    front = _front(costs)
    if front:
        lines += ["", "On the Pareto front of test accuracy against cost (no point is cheaper and at least as "
                  "accurate): " + ", ".join(f"#{i + 1}" for i in sorted(front, key=lambda i: costs[i].spent))
                  + "."]
    return lines + [""]


def _front(costs: list[PointCost]) -> set[int]:
    idx = [i for i, c in enumerate(costs) if c.spent is not None]
    return {idx[j] for j in pareto_front([(costs[i].spent, costs[i].acc) for i in idx])}


def pareto_plot(plt, study: str, costs: list[PointCost], png: Path) -> bool:
    """Test accuracy against cost per point, each labelled with its row number in the cost
    table, the Pareto front joined and its points starred; False (nothing drawn) when no point
    has a cost."""
    numbers = {id(c): i for i, c in enumerate(costs, 1)}
    known = [c for c in costs if c.spent is not None]
    if not known:
        return False
    front = _front(known)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(known):
        err = statistics.pstdev(c.accs) if len(c.accs) > 1 else 0.0
        ax.errorbar(c.spent, 100 * c.acc, yerr=100 * err, marker="*" if i in front else "o",
                    markersize=11 if i in front else 6, color="C3" if i in front else "C0", capsize=3)
        ax.annotate(f"#{numbers[id(c)]}", (c.spent, 100 * c.acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
    line = sorted((known[i].spent, 100 * known[i].acc) for i in front)
    ax.plot([p[0] for p in line], [p[1] for p in line], "C3--", alpha=0.6, label="Pareto front")
    amortised = all(c.total is not None for c in known)
    ax.set_xlabel("wall seconds per trial, all told (pool amortised)" if amortised
                  else "wall seconds per trial (distillation + evaluation; pool not counted)")
    ax.set_ylabel("test accuracy (%), mean ± std")
    ax.set_title(f"{study}: accuracy against cost (# = row of the cost table)")
    ax.legend(fontsize=8)
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
