"""REPRODUCTION.md's verdict table, re-derived from the committed per-trial rows.

    python bench/verdicts.py [ROWS_DIR]          # default bench/repro/rows: prints the Markdown table

Every ``*.parquet`` under ROWS_DIR is one study's rows (``ptmdd rows``); each claim of each study
is tested as ``ptmdd report`` tests it (paired by seed, Holm-adjusted over the study's claims), so
this table is the one REPRODUCTION.md shows between its ``verdicts`` markers, and
tests/test_reproduction.py fails when the two differ.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ptmdd_ray.report import claim_results, pm
from ptmdd_ray.rows import read_rows

HEADER = ["| study | claim | n | acc. | than acc. | difference [95% CI] | p | p (Holm) | verdict |",
          "|---|---|---|---|---|---|---|---|---|"]


def verdict_rows(rows_dir: str | Path) -> list[str]:
    """One Markdown row per claim of every rows file, studies in name order, claims in file order."""
    lines = []
    for path in sorted(Path(rows_dir).glob("*.parquet")):
        run = read_rows(path)
        for f in claim_results(run, run.rows):
            t = f["test"]
            if t is None:
                cells = [str(len(f["acc"])), pm(f["acc"]), pm(f["base"]), "-", "-", "-"]
            else:
                lo, hi = t["ci"]
                cells = [str(t["n"]), pm(f["acc"]), pm(f["base"]),
                         f"{100 * t['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]", f"{t['p']:.3g}",
                         f"{f['p_holm']:.3g} (of {f['family']})"]
            lines.append(f"| {path.stem} | {f['claim']} | " + " | ".join(cells) + f" | **{f['verdict']}** |")
    return lines


def table(rows_dir: str | Path) -> str:
    return "\n".join(HEADER + verdict_rows(rows_dir))


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "repro" / "rows"))
