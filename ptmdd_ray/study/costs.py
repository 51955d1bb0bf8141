"""How a study's trials share their PTMs, which divides each PTM's training cost among them
(``cost.pool_amortised``, :mod:`ptmdd_ray.cost`)."""
from __future__ import annotations

from collections import Counter

from ..study_spec import Study


def ptm_users(study: Study, search_trials: int = 0) -> dict[str, int]:
    """{PTM key: number of the study's trials whose pool holds it}. A grid's trials are known
    before it runs (every point x sample; a trial whose weights leave its pool idle uses none).
    A search's are not: each of its ``search_trials`` is counted as using the base config's pool,
    an even share that is exact when neither the pool nor a weight that can switch it off is
    searched."""
    if search_trials:
        return {key: search_trials for key in _pool_keys(study.trial_config(study.grid[0], 0))}
    users: Counter[str] = Counter()
    for point in study.grid:
        for sample in range(study.spec.samples):
            users.update(_pool_keys(study.trial_config(point, sample)))
    return dict(users)


def _pool_keys(cfg) -> set[str]:
    """The keys of the PTMs a trial's cost counts: its guiding pool (unless idle) at ``pool.epoch``
    and, for MTT, each expert trajectory at the last epoch a segment reaches."""
    from ..config import mtt_reach, uses_ptms
    from ..pool import pool_specs

    keys = {s.key(cfg.pool.epoch) for s in pool_specs(cfg)} if cfg.pool.archs and uses_ptms(cfg) else set()
    if cfg.distill.method == "mtt":
        keys |= {s.key(mtt_reach(cfg.distill)) for s in pool_specs(cfg)}
    return keys
