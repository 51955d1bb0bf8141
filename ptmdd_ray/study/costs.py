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
    from ..config import uses_ptms
    from ..pool import pool_specs

    if search_trials:
        first = study.trial_config(study.grid[0], 0)
        return {s.key(first.pool.epoch): search_trials for s in pool_specs(first)} if first.pool.archs else {}
    users: Counter[str] = Counter()
    for point in study.grid:
        for sample in range(study.spec.samples):
            cfg = study.trial_config(point, sample)
            if cfg.pool.archs and uses_ptms(cfg):
                users.update(s.key(cfg.pool.epoch) for s in pool_specs(cfg))
    return dict(users)
