"""Running a study: Ray Tune trials, every one a full ``run_distill``, tracked in MLflow.

:mod:`ptmdd_ray.study_spec` says what a study is and checks it; this package runs it, in three
steps (:func:`run_study`): set up (check what can be checked, join Ray, start the store actor,
open the MLflow parent run, share the data), run (the grid or the Optuna searcher, the Tuner, its
fit) and summarise (the parent run's metrics and report, the summary). Trials share the PTM store
through its Ray actor (so a PTM is trained once per study, not once per trial) and report to
MLflow as nested runs of one parent. A trial is :func:`trial`, a module-level function that Tune
hands a :class:`TrialContext` (``tune.with_parameters``) rather than a closure over the driver's
locals.

The package holds one module per part: :mod:`.driver` (:func:`run_study`'s steps), :mod:`.plan`
(the call's options resolved and checked), :mod:`.cluster` (joining Ray), :mod:`.parent` (the
MLflow parent run), :mod:`.searcher` (Optuna or the grid), :mod:`.trial` (one trial) and
:mod:`.checkpoints` (its Tune checkpoints).
"""
from .checkpoints import TuneCheckpoints
from .cluster import check_address, connect_ray
from .driver import run_study
from .parent import open_parent, summary_metrics
from .plan import StudyPlan
from .trial import PRUNED_REASON, TrialContext, TrialFailed, trial, trial_key

__all__ = ["run_study", "StudyPlan", "TrialContext", "TrialFailed", "TuneCheckpoints", "PRUNED_REASON", "trial",
           "trial_key", "summary_metrics", "open_parent", "check_address", "connect_ray"]
