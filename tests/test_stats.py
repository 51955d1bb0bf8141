"""The claims' statistics: the paired t-test, its interval, verdicts and Holm's correction."""
import pytest

from ptmdd_ray.stats import holm, paired, verdict


def test_paired_test_and_verdicts():
    import pytest

    from ptmdd_ray.stats import paired, t_interval, verdict

    lo, hi = t_interval([0.5, 0.6, 0.7])
    assert lo < 0.6 < hi and hi - 0.6 == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    a = {"0": 0.70, "1": 0.72, "2": 0.71}
    b = {"0": 0.60, "1": 0.63, "2": 0.61, "3": 0.9}  # sample 3 has no partner: left out
    t = paired(a, b)
    assert t["n"] == 3 and t["diff"] == pytest.approx(0.0967, abs=1e-3) and t["p"] < 0.01
    assert verdict(t) == "holds" and verdict(paired(b, a)).startswith("does not hold")
    assert verdict(paired({"0": 0.5, "1": 0.7}, {"0": 0.6, "1": 0.6})).startswith("inconclusive")
    assert paired({"0": 1.0}, {"0": 0.0}) is None and verdict(None).startswith("inconclusive")



def test_holm_multiplies_the_ith_smallest_p_by_m_minus_i_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 0.04 x 1 < 0.03 x 2: monotone
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02, None, 0.02]) == pytest.approx([0.04, None, 0.04])  # a claim with no test is not counted
    assert holm([0.004]) == [0.004] and holm([]) == []


def test_a_verdict_reads_the_adjusted_p_when_given():
    t = paired({"0": 0.71, "1": 0.72, "2": 0.715}, {"0": 0.70, "1": 0.70, "2": 0.70})
    assert 0.01 < t["p"] < 0.05 and verdict(t) == "holds"
    assert verdict(t, p=3 * t["p"]).startswith("inconclusive")
    assert verdict(t, alpha=0.01).startswith("inconclusive")
