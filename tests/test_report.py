"""Report tables and matrices from rows as `collect` builds them (no MLflow needed for the maths)."""
from ptmdd_ray.report import label, matrix, tables


def _row(values, acc, base=0.5):
    return {"values": values, "params": {}, "metrics": {"acc.mean": acc, "baseline.random.mean": base}}


def test_labels_are_short_and_stable():
    assert label(None) == "default"
    assert label(["ConvNetW32", "MLP"]) == "ConvNetW32+MLP"
    assert label({"domain": "invert", "classes": [0, 1]}) == "classes=0+1,domain=invert"
    assert label(30.0) == "30.0"


def test_tables_group_by_value_within_the_other_swept_values():
    rows = [_row({"pool.seeds": "1", "pool.archs": "A"}, 0.6), _row({"pool.seeds": "1", "pool.archs": "A"}, 0.8),
            _row({"pool.seeds": "2", "pool.archs": "A"}, 0.9), _row({"pool.seeds": "1", "pool.archs": "A+B"}, 0.7)]
    t = tables(["pool.archs", "pool.seeds"], rows)
    seeds = t["pool.seeds"]
    assert [(v, o, sorted(a)) for v, o, a, _ in seeds] == [
        ("1", "pool.archs=A", [0.6, 0.8]), ("2", "pool.archs=A", [0.9]), ("1", "pool.archs=A+B", [0.7])]
    assert all(b == [0.5] * len(a) for _, _, a, b in seeds)
    rws, cols, cells = matrix(seeds)
    assert rws == ["1", "2"] and cols == ["pool.archs=A", "pool.archs=A+B"]
    assert cells[("2", "pool.archs=A")] == [0.9] and ("2", "pool.archs=A+B") not in cells


def test_numeric_values_sort_as_numbers():
    rows = [_row({"pool.epoch": e}, 0.5) for e in ("10", "2", "150")]
    assert [v for v, *_ in tables(["pool.epoch"], rows)["pool.epoch"]] == ["2", "10", "150"]
