"""A search's report from its Optuna study: which parameters mattered (Optuna's importances, with
the evaluator named), how the search went (optimisation history), where its trials went
(parallel coordinates), and, with a second objective, the Pareto front of its completed trials.

Read from the search's Optuna storage (every driver's trials of the study, not only one
invocation's). Importances from a handful of trials are noise: below :func:`trials_needed`
completed trials the report says how many more it needs instead of printing them.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TRIALS_PER_PARAM = 10  # completed trials per searched parameter before importances are printed
MIN_TRIALS = 20
IMPORTANCE_SEED = 0
IMPORTANCE_TREES = 64  # fANOVA's forest (Optuna's default)


def trials_needed(n_params: int) -> int:
    """Completed trials before importances mean something: :data:`TRIALS_PER_PARAM` per searched
    parameter, at least :data:`MIN_TRIALS` (fANOVA fits a random forest to (params, value) pairs;
    with fewer it ranks whatever the few values happened to be)."""
    return max(MIN_TRIALS, TRIALS_PER_PARAM * n_params)


@dataclass(frozen=True)
class Objectives:
    """The search's objectives: (metric, "max"|"min") each, the study's metric first."""

    pairs: tuple[tuple[str, str], ...]

    @property
    def names(self) -> list[str]:
        return [m for m, _ in self.pairs]


def search_section(storage: str, study_name: str, objectives: Objectives, out: Path) -> tuple[list[str], list[Path]]:
    """The report's lines on the Optuna study and the PNGs they show (written into ``out``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return [f"## Optuna study `{study_name}`", "", f"No Optuna study `{study_name}` in the search's storage.", ""], []
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    states = {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    lines = [f"## Optuna study `{study_name}`", "",
             f"{len(study.trials)} trials in the storage (every driver's): " +
             ", ".join(f"{n} {k.lower()}" for k, n in states.items() if n) + ". Objectives: " +
             ", ".join(f"{m} ({'maximised' if d == 'max' else 'minimised'})" for m, d in objectives.pairs) + ".", ""]
    if not done:
        return lines, []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[Path] = []
    lines += _importance_lines(study, done, objectives, out, plt, files)
    for name, draw in _plots(study, objectives):
        files += _save(plt, draw, out / name)
    lines += [f"![{p.stem.replace('_', ' ')}]({p.name})" for p in files
              if p.name in ("optuna_history.png", "optuna_parallel_coordinate.png")] + [""]
    if len(objectives.pairs) > 1:
        lines += _pareto_lines(study, objectives)
    return lines, files


def _importance_lines(study, done, objectives: Objectives, out: Path, plt, files: list[Path]) -> list[str]:
    """Each objective's parameter importances (fANOVA), or how many trials they still need."""
    import optuna

    params = sorted({k for t in done for k in t.params})
    need = trials_needed(len(params))
    head = ["### Parameter importances", ""]
    if len(done) < need:
        return head + [f"Not yet: importances need {need} completed trials ({TRIALS_PER_PARAM} per searched "
                       f"parameter, at least {MIN_TRIALS}) and the study has {len(done)}; run "
                       f"{need - len(done)} more (`ptmdd search ... --trials {need - len(done)}` continues it).", ""]
    lines = head + [f"Evaluator: fANOVA (`optuna.importance.FanovaImportanceEvaluator`, {IMPORTANCE_TREES} trees, seed "
                    f"{IMPORTANCE_SEED}) on {len(done)} completed trials; importances are normalised to sum to 1.",
                    "", "| parameter | " + " | ".join(objectives.names) + " |", "|---|" + "---|" * len(objectives.pairs)]
    by_obj = []
    for i, name in enumerate(objectives.names):
        target = (lambda t, i=i: t.values[i]) if len(objectives.pairs) > 1 else None
        by_obj.append(optuna.importance.get_param_importances(
            study, evaluator=_evaluator(), target=target))
        png = out / f"importances_{i}.png"
        files += _save(plt, lambda target=target, name=name: optuna.visualization.matplotlib.plot_param_importances(
            study, evaluator=_evaluator(), target=target,
            target_name=name), png)
    ranked = sorted(params, key=lambda p: -by_obj[0].get(p, 0.0))
    lines += [f"| `{p}` | " + " | ".join(f"{imp.get(p, 0.0):.3f}" for imp in by_obj) + " |" for p in ranked]
    return lines + [""] + [f"![importances for {n}](importances_{i}.png)" for i, n in enumerate(objectives.names)] + [""]


def _evaluator():
    import optuna

    return optuna.importance.FanovaImportanceEvaluator(n_trees=IMPORTANCE_TREES, seed=IMPORTANCE_SEED)


def _plots(study, objectives: Objectives):
    """(file name, drawing) of Optuna's matplotlib views of the study."""
    import optuna.visualization.matplotlib as vis

    first = objectives.names[0]
    target = (lambda t: t.values[0]) if len(objectives.pairs) > 1 else None
    yield "optuna_history.png", lambda: vis.plot_optimization_history(study, target=target, target_name=first)
    yield "optuna_parallel_coordinate.png", lambda: vis.plot_parallel_coordinate(study, target=target,
                                                                                  target_name=first)
    if len(objectives.pairs) > 1:
        yield "optuna_pareto_front.png", lambda: vis.plot_pareto_front(study, target_names=objectives.names)


def _save(plt, draw, png: Path) -> list[Path]:
    """Draw one of Optuna's (experimental) matplotlib views into ``png``; [] if it cannot draw the
    study (e.g. a parallel coordinate of one parameter), said in the log, not raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental, on every call
        try:
            ax = draw()
        except (ValueError, RuntimeError) as e:
            log.warning("%s not drawn: %s", png.name, e)
            return []
    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [png]


def _pareto_lines(study, objectives: Objectives) -> list[str]:
    """The completed trials on the Pareto front (Optuna's ``best_trials``), best first objective first."""
    sign = -1 if objectives.pairs[0][1] == "max" else 1
    front = sorted(study.best_trials, key=lambda t: sign * t.values[0])
    params = sorted({k for t in front for k in t.params})
    lines = ["### Pareto front", "", f"{len(front)} completed trials no other beats on both objectives:", "",
             "| trial | " + " | ".join(f"`{p}`" for p in params) + " | " + " | ".join(objectives.names) + " |",
             "|---|" + "---|" * (len(params) + len(objectives.pairs))]
    for t in front:
        lines.append(f"| {t.number} | " + " | ".join(_fmt(t.params.get(p)) for p in params) + " | " +
                     " | ".join(_fmt(v) for v in t.values) + " |")
    return lines + ["", "![Pareto front](optuna_pareto_front.png)", ""]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
