"""A search's Optuna searcher, or the grid, as Tune's search algorithm and parameter space."""
from __future__ import annotations

from typing import Any

from .. import tracking
from ..study_spec import Study, objectives, optuna_space
from .plan import StudyPlan
from .trial import PRUNED_REASON, TrialContext, trial_key


def searcher_for(study: Study, plan: StudyPlan, ctx: TrialContext) -> tuple[Any, dict[str, Any], int]:
    """(searcher, param space, samples): a search's Optuna searcher, or the grid (every point
    crossed with every sample) for Tune to run once."""
    from ray import tune

    from ..search import TrialSeededTPESampler, open_storage

    spec = study.spec
    if not plan.search_trials:
        return None, {"overrides": tune.grid_search(study.grid),
                      "sample": tune.grid_search(list(range(spec.samples)))}, 1
    # Several drivers may search one study at once (a shared storage): the storage survives a
    # concurrent schema creation, the study a concurrent create_study (OptunaSearch loads it),
    # and each trial is sampled with its own seed, from its storage-assigned number, so that
    # concurrent drivers propose different points while one driver's search repeats exactly.
    # with a second objective, a multi-objective Optuna study (its directions in the storage):
    # each trial's final report tells Optuna both values
    metrics, modes = zip(*objectives(spec))
    searcher = PruningAwareOptunaSearch(space=optuna_space(spec.search),
                                        metric=list(metrics) if len(metrics) > 1 else metrics[0],
                                        mode=list(modes) if len(modes) > 1 else modes[0],
                                        study_name=spec.name, storage=open_storage(plan.optuna_storage),
                                        sampler=TrialSeededTPESampler(study.trial_config(study.grid[0], 0).seed),
                                        tracking_uri=plan.mlflow_uri, parent_id=ctx.parent)
    return searcher, {}, plan.search_trials


def PruningAwareOptunaSearch(tracking_uri: str | None = None, parent_id: str | None = None, **kwargs):
    """Ray's OptunaSearch, except that a trial stopped by the scheduler before its final
    evaluation is told to Optuna as PRUNED (Ray would record its last intermediate accuracy as the
    trial's value, a partial evaluation posing as a complete one), and its MLflow run (under
    ``parent_id``) is closed KILLED here if its worker could not: Tune ends a stopped trial's
    actor without waiting for the trial function, whose own KILLED may not get through in time
    (then the run would end FAILED, "stopped before it finished", at the end of the search)."""
    from ray.tune.search.optuna import OptunaSearch

    class Search(OptunaSearch):
        def on_trial_result(self, trial_id, result):
            # progress reports (iteration, loss) carry no score to tell Optuna; a multi-objective
            # study takes final values only (Ray's OptunaSearch ignores intermediate ones)
            if not isinstance(self.metric, list) and self.metric in result:
                super().on_trial_result(trial_id, result)

        def suggest(self, trial_id):
            config = super().suggest(trial_id)
            if isinstance(config, dict):
                self.__dict__.setdefault("_ptmdd_configs", {})[trial_id] = config
            return config

        def on_trial_complete(self, trial_id, result=None, error=False):
            config = self.__dict__.get("_ptmdd_configs", {}).pop(trial_id, None)
            if result and not error and not result.get("trial.final"):
                result = {k: v for k, v in result.items() if k != self.metric}  # no value: PRUNED
                if tracking_uri and parent_id and config is not None:
                    tracking.end_stopped(tracking_uri, parent_id, trial_key(config), PRUNED_REASON)
            super().on_trial_complete(trial_id, result, error)

    return Search(**kwargs)

