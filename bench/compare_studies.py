"""Paired comparison of two studies run on the same grid points and samples (seeds), e.g. the same
DM runs with and without ``distill.compile``: per grid point, the mean accuracy of each, the paired
difference (first minus second) [95% CI] and the two-sided paired t-test p-value, on test and on
validation. A benchmark's accuracy check, not a claim of the paper.

    .venv/bin/python bench/compare_studies.py --results runs/repro-val/results compiled loss_weights_alpha
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from ptmdd_ray.report import collect, paired
    from ptmdd_ray.tracking import default_tracking_uri

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--results", default="runs/studies", help="the studies' --results directory")
    p.add_argument("--mlflow-uri", help="default: the SQLite file under --results")
    args = p.parse_args()
    uri = args.mlflow_uri or default_tracking_uri(str(Path(args.results).resolve()))
    _, swept_a, rows_a = collect(uri, args.first)
    _, _, rows_b = collect(uri, args.second)
    print(f"| point | metric | {args.first} | {args.second} | difference [95% CI], p |")
    print("|---|---|---|---|---|")
    for point in sorted({tuple(sorted(r["values"].items())) for r in rows_a}):
        mine = [r for r in rows_a if tuple(sorted(r["values"].items())) == point]
        theirs = [r for r in rows_b if all(r["point"].get(k, r["params"].get(k)) is not None
                                           and _label(r, k) == v for k, v in point)]
        for metric in ("acc.mean", "val.acc.mean"):
            a = {r["sample"]: 100 * r["metrics"][metric] for r in mine if metric in r["metrics"]}
            b = {r["sample"]: 100 * r["metrics"][metric] for r in theirs if metric in r["metrics"]}
            t = paired(a, b)
            test = "-" if t is None else (f"{t['diff']:+.2f} [{t['ci'][0]:+.2f}, {t['ci'][1]:+.2f}], "
                                          f"p = {t['p']:.3g} (n = {t['n']})")
            print(f"| {', '.join(f'{k}={v}' for k, v in point)} | {metric} | {_pm(a)} | {_pm(b)} | {test} |")


def _label(row: dict, key: str) -> str:
    from ptmdd_ray.report import label

    return label(row["point"][key]) if key in row["point"] else row["params"].get(key, "-")


def _pm(values: dict[str, float]) -> str:
    """mean ± std (over the seeds, as ``ptmdd report`` writes it)."""
    from ptmdd_ray.report import _pm

    return _pm([v / 100 for v in values.values()])


if __name__ == "__main__":
    main()
