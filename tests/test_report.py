"""Report tables and matrices from rows as `rows.from_mlflow` builds them (no MLflow needed for the maths)."""
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
    assert [(g.value, g.others, sorted(g.accs)) for g in seeds] == [
        ("1", "pool.archs=A", [0.6, 0.8]), ("2", "pool.archs=A", [0.9]), ("1", "pool.archs=A+B", [0.7])]
    assert all(g.bases == [0.5] * len(g.accs) for g in seeds)
    assert all(r["values"]["pool.seeds"] == g.value for g in seeds for r in g.members)
    rws, cols, cells = matrix(seeds)
    assert rws == ["1", "2"] and cols == ["pool.archs=A", "pool.archs=A+B"]
    assert cells[("2", "pool.archs=A")] == [0.9] and ("2", "pool.archs=A+B") not in cells


def test_numeric_values_sort_as_numbers():
    rows = [_row({"pool.epoch": e}, 0.5) for e in ("10", "2", "150")]
    assert [g.value for g in tables(["pool.epoch"], rows)["pool.epoch"]] == ["2", "10", "150"]


def test_claims_pair_trials_with_the_control_and_the_random_baseline():
    import json
    from ptmdd_ray.rows import StudyRun

    from ptmdd_ray.report import claim_results

    def row(point, sample, acc, base):
        return {"point": point, "sample": str(sample), "values": {},
                "metrics": {"acc.mean": acc, "baseline.random.mean": base}}

    control = {"loss.clom": 0.0}
    rows = [row({"pool.seeds": 4}, s, 0.80 + 0.01 * s, 0.5) for s in range(3)]
    rows += [row({"pool.seeds": 1}, s, 0.78 + 0.01 * s, 0.5) for s in range(3)]
    rows += [row(control, s, 0.70 + 0.012 * s, 0.5) for s in range(3)]
    claims = [{"claim": "PTMs help", "better": {"pool.seeds": 4}, "than": "control"},
              {"claim": "beats random", "better": {"pool.seeds": 1}, "than": "random"},
              {"claim": "more seeds help", "better": {"pool.seeds": 4}, "than": {"pool.seeds": 1}}]
    parent = StudyRun('p', {"ptmdd.claims": json.dumps(claims),
                                                        "ptmdd.control": json.dumps(control)})
    found = {f["claim"]: f for f in claim_results(parent, rows)}
    assert found["PTMs help"]["verdict"] == "holds" and found["PTMs help"]["than"] == "the plain method"
    assert found["beats random"]["verdict"] == "holds"
    assert found["more seeds help"]["test"]["diff"] == 0.02 or abs(found["more seeds help"]["test"]["diff"] - 0.02) < 1e-9


def test_cross_architecture_table_pairs_each_arch_with_the_plain_method():
    from ptmdd_ray.report import arch_lines, eval_archs

    def row(clom, sample, a, b):
        return {"values": {"loss.clom": clom}, "sample": sample, "point": {"loss.clom": float(clom)},
                "metrics": {"acc.mean": (a + b) / 2, "acc.ConvNet.mean": a, "acc.VGG11.mean": b,
                            "baseline.random.ConvNet.mean": 0.2 + int(sample) / 100,
                            "baseline.random.VGG11.mean": 0.1}}

    plain = [row("0.0", s, 0.40 + d, 0.30 + d) for s, d in (("0", 0.0), ("1", 0.01), ("2", 0.02))]
    clom = [row("30.0", s, 0.45 + d, 0.30 + d + e) for (s, d), e in zip((("0", 0.0), ("1", 0.01), ("2", 0.02)),
                                                                        (0.001, -0.001, 0.0))]
    assert eval_archs(plain) == ["ConvNet", "VGG11"]
    lines = arch_lines(["loss.clom"], plain + clom, plain)
    assert lines[4] == "| point | ConvNet | VGG11 |"
    plain_line, clom_line = lines[6], lines[7]
    assert plain_line.startswith("| loss.clom=0.0 | 41.00 ± 0.82 | 31.00 ± 0.82 |") and "<br>" not in plain_line
    assert "46.00 ± 0.82<br>+5.00 [+5.00, +5.00], p=0" in clom_line  # the same +5 on every seed
    assert "+0.00 [" in clom_line.split("|")[3]  # VGG11: no difference, not significant
    assert lines[8] == "| random real | 21.00 ± 0.82 | 10.00 ± 0.00 |"  # per seed, not per trial
    assert arch_lines(["loss.clom"], [{**r, "metrics": {"acc.mean": 0.4, "acc.ConvNet.mean": 0.4}} for r in plain],
                      plain) == []  # one architecture: nothing to add


def test_a_best_claim_is_chosen_on_validation_and_tested_on_test():
    """``better: {loss.clom: best}``: the weight whose trials score highest on the validation
    metric, whatever the test split says; the claim then pairs that weight's *test* accuracy."""
    import json
    from ptmdd_ray.rows import StudyRun

    from ptmdd_ray.report import choose, claim_results

    def row(clom, sample, test, val):
        return {"point": {"loss.clom": clom}, "sample": str(sample), "values": {},
                "metrics": {"acc.mean": test, "val.acc.mean": val, "baseline.random.mean": 0.3}}

    rows = [row(0.0, s, 0.60 + 0.01 * s, 0.50) for s in range(3)]
    rows += [row(10.0, s, 0.70 + 0.01 * s, 0.55) for s in range(3)]  # best on validation
    rows += [row(100.0, s, 0.90, 0.54) for s in range(3)]  # best on test: must not be chosen
    assert choose({"loss.clom": "best"}, rows, "val.acc.mean") == {"loss.clom": 10.0}
    assert choose({"loss.clom": "best"}, rows, "acc.mean") == {"loss.clom": 100.0}
    # the claim's reference is no candidate: the best weight other than 10 is 100 (0.54 > 0.50)
    assert choose({"loss.clom": "best"}, rows, "val.acc.mean", {"loss.clom": 10.0}) == {"loss.clom": 100.0}
    claims = [{"claim": "CLoM helps", "better": {"loss.clom": "best"}, "than": "control"}]
    parent = StudyRun('p', {"ptmdd.claims": json.dumps(claims), "ptmdd.metric":
                                                        "val.acc.mean", "ptmdd.control": json.dumps({"loss.clom": 0.0})})
    (found,) = claim_results(parent, rows)
    assert found["better"] == "loss.clom=10.0 (best on val.acc.mean)"
    assert abs(found["test"]["diff"] - 0.10) < 1e-9 and found["verdict"] == "holds"


def test_the_report_names_the_point_chosen_on_validation_with_its_test_accuracy():
    from ptmdd_ray.rows import StudyRun

    from ptmdd_ray.report import selection_lines

    def row(clom, test, val):
        return {"point": {"loss.clom": clom}, "metrics": {"acc.mean": test, "val.acc.mean": val}}

    rows = [row(10.0, 0.70, 0.60), row(10.0, 0.72, 0.62), row(100.0, 0.90, 0.50)]
    parent = StudyRun('p', {"ptmdd.metric": "val.acc.mean"})
    text = "\n".join(selection_lines(parent, rows))
    assert "Best point on `val.acc.mean`: loss.clom=10.0, 61.00 ± 1.00 on it; test accuracy 71.00 ± 1.00" in text
    parent.tags["ptmdd.select_on_test"] = "true"
    assert "Selected on test accuracy" in "\n".join(selection_lines(parent, rows))


def test_a_cases_study_gets_one_table_with_a_row_per_case_in_order():
    from ptmdd_ray.report import case_lines

    def row(point, sample, acc):
        return {"point": point, "sample": str(sample), "values": {},
                "metrics": {"acc.mean": acc, "val.acc.mean": acc - 0.01, "baseline.random.mean": 0.3}}

    cases = [{"loss.clom": 0.0}, {"pool.seeds": 2}, {"pool.source": {"classes": [0, 1]}, "loss.clom": 0.0,
                                                      "loss.cclom": 1.0}]
    rows = [row(c, s, 0.5 + 0.1 * i + 0.01 * s) for i, c in enumerate(cases) for s in range(2)]
    plain = {"0": 0.5, "1": 0.51}
    lines = case_lines(cases, rows, plain, {"loss.clom": 0.0})
    body = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| case")]
    assert [ln.split(" | ")[0] for ln in body] == ["| clom=0", "| seeds=2", "| source=classes=0+1 clom=0 cclom=1"]
    assert all(ln.split(" | ")[1] == "2" for ln in body)  # each case its own two samples, none borrowed
    assert body[0].endswith("| the plain method |") and "p=" in body[1]


def test_a_search_report_ranks_its_trials_by_the_search_metric():
    from ptmdd_ray.rows import StudyRun

    from ptmdd_ray.report import search_lines

    def row(clom, val, test):
        return {"params": {"loss.clom": str(clom)}, "metrics": {"val.acc.mean": val, "acc.mean": test}}

    rows = [row(3.0, 0.40, 0.45), row(30.0, 0.52, 0.50), row(300.0, 0.47, 0.55)]
    parent = StudyRun('p', {"ptmdd.metric": "val.acc.mean", "ptmdd.kind": "search"})
    lines = search_lines(parent, rows, ["loss.clom"])
    assert "Best trial (Optuna's best params): `loss.clom` = 30.0; val.acc.mean 52.00, test 50.00." in lines
    ranked = [ln for ln in lines if ln.startswith("| ") and ln[2].isdigit()]
    assert [ln.split(" | ")[1] for ln in ranked] == ["30.0", "300.0", "3.0"]  # by validation, not by test


def test_claims_are_one_family_their_verdicts_read_the_holm_adjusted_p():
    """Three claims: one clear, one at p ~ 0.035 alone, one null. Alone the second holds; as the
    second smallest of three its p is doubled and it is no longer significant."""
    import json

    from ptmdd_ray.report import claim_results, findings_lines
    from ptmdd_ray.rows import StudyRun
    from ptmdd_ray.stats import holm

    def row(point, sample, acc):
        return {"point": point, "sample": str(sample), "values": {}, "metrics": {"acc.mean": acc}}

    control = {"loss.clom": 0.0}
    rows = [row(control, s, 0.50) for s in range(3)]
    rows += [row({"loss.clom": 1.0}, s, 0.60 + 0.001 * s) for s in range(3)]  # clear
    rows += [row({"loss.clom": 2.0}, s, 0.50 + d) for s, d in enumerate((0.01, 0.02, 0.015))]  # p ~ 0.035
    rows += [row({"loss.clom": 3.0}, s, 0.50 + d) for s, d in enumerate((0.01, -0.01, 0.0))]  # null
    claims = [{"claim": f"alpha {a} helps", "better": {"loss.clom": a}, "than": "control"} for a in (1.0, 2.0, 3.0)]
    run = StudyRun("p", {"ptmdd.claims": json.dumps(claims), "ptmdd.control": json.dumps(control)})
    found = claim_results(run, rows)
    raw = [f["test"]["p"] for f in found]
    assert 0.02 < raw[1] < 0.05 and raw[2] > 0.5
    assert [f["p_holm"] for f in found] == holm(raw) and all(f["family"] == 3 for f in found)
    assert [f["verdict"] for f in found] == ["holds", "inconclusive at this scale", "inconclusive at this scale"]
    table = "\n".join(findings_lines(found))
    assert "Holm-adjusted over the 3 tested" in table and "| p (Holm) |" in table
    assert f"p={raw[1]:.3g} | {2 * raw[1]:.3g} |" in table  # raw and adjusted side by side


def test_the_report_states_its_sample_size_and_the_evaluation_against_the_reference():
    from ptmdd_ray.report import design_lines, protocol_lines
    from ptmdd_ray.rows import StudyRun

    def row(point, method, runs, epochs):
        return {"point": point, "params": {"distill.method": method, "eval.runs": runs, "eval.epochs": epochs}}

    rows = [row({"a": 1}, "dm", "3", "300") for _ in range(5)] + [row({"a": 2}, "dm", "3", "300") for _ in range(4)]
    text = "\n".join(design_lines(StudyRun("p", {"ptmdd.samples": "5"}), rows))
    assert "5 samples (seeds) per point, fixed in the study file before it ran" in text and "a=2 n=4" in text
    assert "all 1 points finished" in "\n".join(design_lines(StudyRun("p", {"ptmdd.samples": "5"}), rows[:5]))
    assert "3 models × 300 epochs per architecture; the reference: 5 × 1000 (shortened here" in \
        "\n".join(protocol_lines(rows))
    assert protocol_lines([row({}, "dc", "5", "300")]) == [
        "Evaluation (DC): 5 models × 300 epochs per architecture; the reference: 5 × 300.", ""]
