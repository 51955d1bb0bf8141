"""From YAML text and ``--set`` overrides to a resolved :class:`Config`: read, override, parse, check.

:func:`load_config` is the entry point: a YAML file (or a base mapping) plus ``key=value``
overrides on dotted names, parsed by :func:`~._schema.from_dict` and checked and completed by
:func:`~._checks.resolve`. :func:`anchor_paths` makes a mapping's relative paths absolute, for
study trials that run in working directories of their own.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ._checks import resolve
from ._schema import from_dict
from ._sections import Config, DatasetConfig


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating intermediate mappings."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if isinstance(child, str) and p == "source":  # pool.source: name -> mapping
            child = {"name": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {p} is not a mapping")
        node[p] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value (``distill.ipc=1``, ``pool.archs=[ConvNet,MLP]``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} ({type(e).__name__})") from None
    return key, value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: cannot read {path} ({type(e).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config: malformed YAML in {path}{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping at the top level")
    return data


PATH_PREFIXES = ("parquet:", "imagefolder:")


def anchor_paths(data: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """Make the relative paths of a config mapping (dataset files, roots and caches, a PTM
    source's, the store) absolute against ``base``, in place. A study's trials run in working
    directories of their own, so the paths are anchored where the study was launched."""
    def path(p: str) -> str:
        return p if "://" in p or os.path.isabs(os.path.expanduser(p)) else os.path.join(base, p)

    def dataset(ds: Any, defaults: bool) -> Any:
        if isinstance(ds, str):
            for prefix in PATH_PREFIXES:
                if ds.startswith(prefix):
                    return prefix + path(ds[len(prefix):])
            return ds
        if isinstance(ds, dict):
            if defaults:
                ds.setdefault("root", DatasetConfig.root)
            if isinstance(ds.get("name"), str):
                ds["name"] = dataset(ds["name"], False)
            for key in ("root", "cache_dir"):
                if isinstance(ds.get(key), str):
                    ds[key] = path(ds[key])
        return ds

    if isinstance(data.get("dataset"), dict):
        dataset(data["dataset"], True)
    if isinstance(data.get("pool"), dict) and data["pool"].get("source") is not None:
        data["pool"]["source"] = dataset(data["pool"]["source"], False)
    if isinstance(data.get("store"), str):
        data["store"] = path(data["store"])
    return data


def build_config(data: dict[str, Any]) -> Config:
    """Mapping -> validated, resolved :class:`Config`. A ``pool.source`` mapping starts from the
    target dataset (less its domain and class subset), so ``{domain: invert}`` means "the target,
    inverted" and keeps the target's image size and subset sizes."""
    pool = data.get("pool")
    if isinstance(pool, dict) and isinstance(pool.get("source"), dict):
        target = data.get("dataset") or {}
        if isinstance(target, dict):
            inherited = {k: v for k, v in target.items() if k not in ("domain", "classes")}
            data = {**data, "pool": {**pool, "source": {**inherited, **pool["source"]}}}
    return resolve(from_dict(Config, data))


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """YAML file (or ``base`` mapping) + ``--set`` overrides -> validated, resolved :class:`Config`."""
    data = dict(base or {})
    if path is not None:
        data.update(load_yaml(path))
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return build_config(data)
