"""Typed, validated configuration: one object drives the CLI, the tests, Ray Tune and MLflow.

A YAML mapping is parsed into frozen dataclasses, which reject unknown keys and wrong types with a
:class:`ConfigError` whose one-line message names the dotted key (``distill.ipc``). ``None`` in a
field means "the published default for the chosen method"; :func:`resolve` fills those in, so the
resolved config written to ``result.json`` is the complete record of what ran. :func:`flatten`
gives the flat dotted names used for ``--set`` overrides, sweeps and MLflow params.

This is the package's face; import from here. Behind it, in reading order:

- :mod:`._sections`: what can be set (the dataclasses, one line of meaning per setting);
- :mod:`._methods`: what the papers fixed (method defaults, DC's loop table, DSA's ops);
- :mod:`._schema`: mapping <-> dataclasses, dotted names, ``describe`` and ``json_schema``;
- :mod:`._checks`: what must hold (one checker per section) and :func:`resolve`;
- :mod:`._parse`: YAML, ``--set`` overrides and paths, up to :func:`load_config`.

The package imports no torch: the domain facts the checks need come from the torch-free
:mod:`ptmdd_ray.sources` (data sets) and :mod:`ptmdd_ray.archs` (architecture names).
"""
from ..errors import ConfigError, check
from ..sources import DOMAINS
from ._checks import (check_dataset, check_device, check_distill, check_eval, check_loss, check_model, check_pool,
                      check_pretrain, resolve)
from ._methods import (COMPILE_AUTO_EVAL_EPOCHS, COMPILE_AUTO_ITERATIONS, DSA_OPS, DSA_STRATEGY, METHOD_DEFAULTS, PUBLISHED_LOOPS,
                       MTT_EXPERT_RECIPE, MTT_TABLE, REFERENCE_EVAL_RUNS, check_strategy, loops_for_ipc,
                       mtt_for_ipc, mtt_table_for)
from ._parse import PATH_PREFIXES, anchor_paths, build_config, load_config, load_yaml, parse_override, set_dotted
from ._schema import describe, flatten, from_dict, json_schema, to_dict
from ._sections import (INITS, METHODS, PRECISIONS, Config, DatasetConfig, DistillConfig, EvalConfig, LossConfig,
                        PoolConfig, PretrainConfig, eval_split, mtt_reach, setting, source_dataset, uses_ptms,
                        weight_for)

__all__ = [
    # the config and its sections
    "Config", "DatasetConfig", "DistillConfig", "PoolConfig", "PretrainConfig", "LossConfig", "EvalConfig",
    "setting",
    # loading and resolving
    "load_config", "build_config", "load_yaml", "parse_override", "set_dotted", "anchor_paths", "PATH_PREFIXES",
    "resolve", "ConfigError", "check",
    "check_dataset", "check_device", "check_distill", "check_eval", "check_loss", "check_model", "check_pool",
    "check_pretrain",
    # dotted names and the readable schema
    "from_dict", "to_dict", "flatten", "describe", "json_schema",
    # reading a resolved config
    "weight_for", "uses_ptms", "source_dataset", "eval_split", "mtt_reach",
    # vocabulary and published defaults
    "METHODS", "INITS", "DOMAINS", "PRECISIONS", "METHOD_DEFAULTS", "REFERENCE_EVAL_RUNS", "COMPILE_AUTO_ITERATIONS", "COMPILE_AUTO_EVAL_EPOCHS",
    "DSA_STRATEGY", "DSA_OPS", "check_strategy", "loops_for_ipc", "PUBLISHED_LOOPS", "MTT_TABLE", "MTT_EXPERT_RECIPE",
    "mtt_for_ipc", "mtt_table_for",
]
