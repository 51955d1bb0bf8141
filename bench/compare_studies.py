"""Paired comparison of two sets of study runs on the same grid points and seeds, e.g. the same DM
runs with and without ``distill.compile``: per grid point, the mean accuracy of each, the paired
difference (first minus second) [95% CI] and the two-sided paired t-test p-value, on test and on
validation. A benchmark's accuracy check, not a claim of the paper.

Runs are paired by their seed (the ``seed`` parameter MLflow recorded, i.e. base seed + sample), so
a side may join several studies (comma-separated) to grow n: seeds 0-2 from one study and 3-5 from
a later one started at ``base.seed=3``.

    .venv/bin/python bench/compare_studies.py --results runs/repro-val/results compiled loss_weights_alpha
    .venv/bin/python bench/compare_studies.py --results runs/repro-val/results \
        compiled,compiled_seeds loss_weights_alpha,eager_seeds
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rows_of(uri: str, studies: str) -> list[dict]:
    """The runs of every study named in ``studies`` (comma-separated); a seed seen twice is an error
    (the pairing would be ambiguous)."""
    from ptmdd_ray.rows import from_mlflow

    rows = []
    for name in studies.split(","):
        rows += from_mlflow(uri, name).rows
    return rows


def seed(row: dict) -> int:
    return int(row["params"].get("seed", row["sample"]))


def by_seed(rows: list[dict], metric: str, side: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in rows:
        if metric in r["metrics"]:
            if seed(r) in out:
                sys.exit(f"compare_studies: seed {seed(r)} appears twice in {side} for one point")
            out[seed(r)] = 100 * r["metrics"][metric]
    return out


def main() -> None:
    from ptmdd_ray.stats import paired
    from ptmdd_ray.tracking import default_tracking_uri

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", help="study name(s), comma-separated")
    p.add_argument("second", help="study name(s), comma-separated")
    p.add_argument("--results", default="runs/studies", help="the studies' --results directory")
    p.add_argument("--mlflow-uri", help="default: the SQLite file under --results")
    args = p.parse_args()
    uri = args.mlflow_uri or default_tracking_uri(str(Path(args.results).resolve()))
    rows_a, rows_b = rows_of(uri, args.first), rows_of(uri, args.second)
    print(f"| point | metric | {args.first} | {args.second} | difference [95% CI], p |")
    print("|---|---|---|---|---|")
    for point in sorted({tuple(sorted(r["values"].items())) for r in rows_a}):
        mine = [r for r in rows_a if tuple(sorted(r["values"].items())) == point]
        theirs = [r for r in rows_b if all(r["point"].get(k, r["params"].get(k)) is not None
                                           and _label(r, k) == v for k, v in point)]
        for metric in ("acc.mean", "val.acc.mean"):
            a, b = by_seed(mine, metric, args.first), by_seed(theirs, metric, args.second)
            t = paired(a, b)
            test = "-" if t is None else (f"{t['diff']:+.2f} [{t['ci'][0]:+.2f}, {t['ci'][1]:+.2f}], "
                                          f"p = {t['p']:.3g} (n = {t['n']})")
            print(f"| {', '.join(f'{k}={v}' for k, v in point)} | {metric} | {_pm(a)} | {_pm(b)} | {test} |")


def _label(row: dict, key: str) -> str:
    from ptmdd_ray.report import label

    return label(row["point"][key]) if key in row["point"] else row["params"].get(key, "-")


def _pm(values: dict[int, float]) -> str:
    """mean ± std (over the seeds, as ``ptmdd report`` writes it)."""
    from ptmdd_ray.report import pm

    return pm([v / 100 for v in values.values()])


if __name__ == "__main__":
    main()
