"""The report's cost section (:mod:`ptmdd_ray.cost_report`): the Pareto front, the per-point
means, the guidance overhead, and trials recorded before cost accounting."""
import matplotlib

from ptmdd_ray.cost_report import cost_lines, pareto_front, pareto_plot, point_costs

matplotlib.use("Agg")


def test_the_pareto_front_keeps_exactly_the_points_nothing_beats():
    pts = [(10.0, 0.50), (20.0, 0.60), (15.0, 0.40), (20.0, 0.55), (30.0, 0.60), (5.0, 0.30)]
    # (15, .40) loses to (10, .50); (20, .55) to (20, .60); (30, .60) to (20, .60)
    assert pareto_front(pts) == {0, 1, 5}
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == {0, 1}  # ties beat neither


def _row(point, sample, acc, **metrics):
    return {"point": point, "sample": str(sample), "metrics": {"acc.mean": acc, **metrics}}


def _costed(distill, pool, share, seconds):
    return {"cost.guide.wall_s": 0.0, "cost.distill.wall_s": distill, "cost.eval.wall_s": 10.0,
            "cost.baseline.wall_s": 0.0, "cost.pool.wall_s": pool, "cost.pool_amortised.wall_s": share,
            "cost.seconds": seconds}


def test_the_cost_table_gives_means_over_samples_and_the_overhead_against_the_plain_method():
    plain, clom = {"loss.clom": 0.0}, {"loss.clom": 1.0}
    rows = [_row(plain, 0, 0.40, **_costed(20.0, 0.0, 0.0, 30.0)), _row(plain, 1, 0.42, **_costed(22.0, 0.0, 0.0, 32.0)),
            _row(clom, 0, 0.45, **_costed(30.0, 100.0, 25.0, 65.0)), _row(clom, 1, 0.47, **_costed(32.0, 100.0, 25.0, 67.0))]
    costs = point_costs(rows)
    c = next(c for c in costs if c.point == clom)
    assert (c.n, c.distill, c.pool_alone, c.pool_amortised, c.total) == (2, 31.0, 100.0, 25.0, 66.0)
    md = "\n".join(cost_lines(costs, plain))
    assert "| 2 | loss.clom=1.0 | 2 | 46.00 | 31.0 | 10.0 | 0.0 | 100.0 | 25.0 | 66.0 |" in md
    assert "| +10.0 / 35.0 / 110.0 |" in md  # 31 - 21; + 25 amortised; + 100 alone
    assert "the plain method |" in md and "Pareto front" in md and "before cost accounting" not in md


def test_trials_without_cost_metrics_fall_back_to_their_timings_and_never_show_a_zero_pool(tmp_path):
    import matplotlib.pyplot as plt

    rows = [_row({"loss.clom": 0.0}, 0, 0.40, **{"distill.seconds": 20.0, "eval.seconds": 12.0}),
            _row({"loss.clom": 1.0}, 0, 0.45, **{"distill.seconds": 30.0, "eval.seconds": 12.0})]
    costs = point_costs(rows)
    md = "\n".join(cost_lines(costs, {"loss.clom": 0.0}))
    assert "| 2 | loss.clom=1.0 | 1 | 45.00 | 30.0 | 12.0 | - | - | - | - |" in md and "+10.0 / - / -" in md
    assert "before cost accounting" in md
    assert pareto_plot(plt, "s", costs, tmp_path / "p.png") and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert not pareto_plot(plt, "s", point_costs([_row({}, 0, 0.4)]), tmp_path / "q.png")
