"""The one error for bad user input, and the one way to raise it.

A :class:`ConfigError` message is one line that starts with the dotted key it is about
(``distill.ipc: must be >= 1, got 0``): the CLI prints it as ``ptmdd: error: ...`` and exits 2.
It lives below everything else, so that the torch-free data-set checks (:mod:`ptmdd_ray.sources`)
and the config schema (:mod:`ptmdd_ray.config`, which re-exports both names) raise the same class.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input. The message is one line and names the offending key."""


def check(cond: object, key: str, msg: str) -> None:
    """Raise ``ConfigError("key: msg")`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")
