"""A search's report from its Optuna study (:mod:`ptmdd_ray.search_report`), on real Optuna
studies in a SQLite storage: importances only with enough trials, the evaluator named, Optuna's
plots, and a multi-objective study's Pareto front."""
import math
import random

import optuna

from ptmdd_ray.search_report import Objectives, search_section, trials_needed

PARAMS = {"loss.clom": optuna.distributions.FloatDistribution(1.0, 100.0, log=True),
          "loss.cclom": optuna.distributions.FloatDistribution(0.0, 1.0)}


def _study(tmp_path, n, directions=("maximize",)):
    """A real Optuna study of ``n`` completed trials whose accuracy depends on loss.clom alone
    (loss.cclom is noise-free irrelevance) and whose cost grows with loss.cclom."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, directions=list(directions))
    rng = random.Random(0)
    for _ in range(n):
        p = {"loss.clom": math.exp(rng.uniform(0, math.log(100))), "loss.cclom": rng.random()}
        acc = 0.3 + 0.05 * math.log(p["loss.clom"])
        values = [acc, 10 + 50 * p["loss.cclom"]][:len(directions)]
        study.add_trial(optuna.trial.create_trial(params=p, distributions=PARAMS, values=values))
    return storage, study


def test_too_few_trials_say_how_many_more_importances_need_instead_of_printing_them(tmp_path):
    storage, _ = _study(tmp_path, 5)
    lines, files = search_section(storage, "s", Objectives((("val.acc.mean", "max"),)), tmp_path)
    text = "\n".join(lines)
    need = trials_needed(2)
    assert f"importances need {need} completed trials" in text and f"run {need - 5} more" in text
    assert "| `loss.clom` |" not in text and not list(tmp_path.glob("importances_*.png"))
    assert {f.name for f in files} == {"optuna_history.png", "optuna_parallel_coordinate.png"}
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files)


def test_importances_name_their_evaluator_and_rank_the_parameter_that_matters_first(tmp_path):
    storage, _ = _study(tmp_path, trials_needed(2) + 5)
    lines, files = search_section(storage, "s", Objectives((("val.acc.mean", "max"),)), tmp_path)
    text = "\n".join(lines)
    assert "FanovaImportanceEvaluator" in text and "seed 0" in text
    rows = [ln for ln in lines if ln.startswith("| `loss.")]
    assert rows[0].startswith("| `loss.clom` |") and float(rows[0].split("|")[2]) > 0.9  # accuracy is clom's alone
    assert (tmp_path / "importances_0.png").exists() and "Pareto front" not in text
    assert f"on {trials_needed(2) + 5} completed trials" in text


def test_a_two_objective_study_reports_its_pareto_front_and_importances_per_objective(tmp_path):
    storage, study = _study(tmp_path, trials_needed(2), directions=("maximize", "minimize"))
    objectives = Objectives((("val.acc.mean", "max"), ("cost.seconds", "min")))
    lines, files = search_section(storage, "s", objectives, tmp_path)
    text = "\n".join(lines)
    front = {t.number for t in study.best_trials}
    listed = {int(ln.split("|")[1]) for ln in lines[lines.index("### Pareto front"):] if ln.startswith("| ")
              and ln.split("|")[1].strip().isdigit()}
    assert listed == front and len(front) >= 2
    assert "| parameter | val.acc.mean | cost.seconds |" in text
    importances = {ln.split("|")[1].strip(): [float(x) for x in ln.split("|")[2:4]] for ln in lines
                   if ln.startswith("| `loss.")}
    assert importances["`loss.clom`"][0] > 0.9 and importances["`loss.cclom`"][1] > 0.9  # each objective its own
    assert {"optuna_pareto_front.png", "importances_0.png", "importances_1.png"} <= {f.name for f in files}


def test_a_missing_study_is_said_not_raised(tmp_path):
    storage, _ = _study(tmp_path, 1)
    lines, files = search_section(storage, "other", Objectives((("val.acc.mean", "max"),)), tmp_path)
    assert "No Optuna study `other`" in "\n".join(lines) and files == []


def test_the_importance_threshold_grows_with_the_searched_parameters():
    assert [trials_needed(n) for n in (1, 2, 3, 5)] == [20, 20, 30, 50]
