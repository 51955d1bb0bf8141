"""The one error for bad user input, the one way to raise it, and the errors a run can end with.

A :class:`ConfigError` message is one line that starts with the dotted key it is about
(``distill.ipc: must be >= 1, got 0``): the CLI prints it as ``ptmdd: error: ...`` and exits 2.
It lives below everything else, so that the torch-free data-set checks (:mod:`ptmdd_ray.sources`)
and the config schema (:mod:`ptmdd_ray.config`, which re-exports both names) raise the same class.
The run-time errors live here too (re-exported where they are raised), so that the CLI can catch
them without importing torch: a bad config is answered before any heavy import.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input. The message is one line and names the offending key."""


def check(cond: object, key: str, msg: str) -> None:
    """Raise ``ConfigError("key: msg")`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


class MemoryShortError(RuntimeError):
    """A run fits the device but not what is free on it now (other processes hold the rest). Unlike a
    :class:`ConfigError` it may not happen again, so a study's trial that meets it is retried and
    resumed rather than recorded as failing for good."""


class DivergenceError(RuntimeError):
    """The distillation loss became NaN or infinite (e.g. a learning rate far too large)."""


class IntegrityError(RuntimeError):
    """A checkpoint's bytes do not match its recorded sha256 (truncated, altered or replaced)."""


class StoreError(RuntimeError):
    """The store cannot be read or written (bad URI, permissions, disk full)."""
