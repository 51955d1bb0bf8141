"""The statistics a study's claims are judged by (pure functions, no torch, no MLflow).

A study's claims are its pre-registered hypotheses: each compares two sets of trials paired by
sample (the same seed: same initial images, real batches and evaluation models), so the test is
the two-sided paired t-test on the per-seed differences. Testing k claims at once at level
``alpha`` each would find a false "holds" in about k x alpha of studies; Holm's step-down
correction (Holm 1979) keeps the family-wise error at ``alpha`` and is never less powerful than
Bonferroni, so verdicts read the Holm-adjusted p-value and reports show it beside the raw one.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

ALPHA = 0.05  # the family-wise error rate of a study's claims


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t confidence interval of the mean (None for fewer than 2 values)."""
    from scipy import stats

    if len(values) < 2:
        return None
    m, s = statistics.fmean(values), statistics.stdev(values)
    h = stats.t.ppf(0.5 + level / 2, len(values) - 1) * s / len(values) ** 0.5
    return m - h, m + h


def paired(a: dict[str, float], b: dict[str, float]) -> dict[str, Any] | None:
    """Paired comparison of a vs b over the samples (seeds) both have: mean difference, its 95%
    interval and the two-sided paired t-test p-value. None with fewer than 2 pairs."""
    from scipy import stats

    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    d = [a[k] - b[k] for k in common]
    mean = statistics.fmean(d)
    sd = statistics.stdev(d)
    if sd == 0:
        p = 0.0 if mean != 0 else 1.0
    else:
        p = float(2 * stats.t.sf(abs(mean / (sd / len(d) ** 0.5)), len(d) - 1))
    return {"n": len(d), "diff": mean, "ci": t_interval(d), "p": p}


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, in the input's order (None stays None and is not counted).

    The i-th smallest of m p-values is multiplied by m - i (i from 0), made monotone (an adjusted
    p is never below the one before it in sorted order) and capped at 1; a claim holds at family
    level ``alpha`` exactly when its adjusted p is below ``alpha``."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None and not math.isnan(p))
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        out[i] = running
    return out


def verdict(test: dict[str, Any] | None, alpha: float = ALPHA, p: float | None = None) -> str:
    """holds (significantly better), does not hold (significantly worse) or inconclusive; ``p``
    (e.g. Holm-adjusted) replaces the test's own p-value when given."""
    if test is None:
        return "inconclusive (fewer than 2 paired samples)"
    if (test["p"] if p is None else p) < alpha:
        return "holds" if test["diff"] > 0 else "does not hold (the opposite is significant)"
    return "inconclusive at this scale"
