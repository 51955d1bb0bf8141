"""How a mapping becomes a config and back: type checking against the annotations, dotted names,
and the two readable forms of the schema (:func:`describe` for ``ptmdd config``, :func:`json_schema`
for editors).

:func:`from_dict` rejects unknown keys and wrong types with a :class:`ConfigError` whose message
names the dotted key (``distill.ipc``). :func:`flatten` gives the flat dotted names used for
``--set`` overrides, sweeps and MLflow params. Everything here reads the dataclasses' annotations
and field metadata, so a setting is declared once, in :mod:`._sections`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, Union

from ..errors import ConfigError
from ._sections import Config

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        k_tp, v_tp = typing.get_args(tp)
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(float(value)):
                raise ConfigError(f"{key}: NaN is not allowed")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - annotation we do not support
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain-data (YAML/JSON-ready) form of a config object."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flat dotted names (``distill.ipc``) -> values, the vocabulary shared by ``--set``, sweeps and
    MLflow params. Lists and weight maps stay whole values."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    out: dict[str, Any] = {}
    for k, v in data.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("clom", "cclom"):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def describe(cfg: Config | None = None) -> list[dict[str, Any]]:
    """Every flat key of ``cfg`` (default: the unresolved defaults) with its value, its type and the
    one-line meaning kept in its field's ``help`` metadata: what ``ptmdd config`` prints. Names and
    values come from :func:`flatten` and the rest from the fields, so nothing is spelled twice."""
    def field_at(cls: type, key: str) -> tuple[dataclasses.Field, Any]:
        head, _, rest = key.partition(".")
        tp = typing.get_type_hints(cls)[head]
        if not rest:
            return next(f for f in fields(cls) if f.name == head), tp
        return field_at(next(t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)), rest)

    rows = []
    for key, value in flatten(Config() if cfg is None else cfg).items():
        f, tp = field_at(Config, key)
        rows.append({"key": key, "default": value, "type": _type_name(tp), "help": f.metadata.get("help", "")})
    return rows


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of the YAML config file, built from the dataclasses: every key
    with its type, default, meaning (``description``) and allowed values (``enum``), unknown keys
    rejected. Point an editor's YAML language server at it to complete and check config files;
    :func:`~ptmdd_ray.config.resolve` still does the range and domain checks it cannot express."""
    defs: dict[str, Any] = {}
    root = _object_schema(Config, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "ptmdd_ray config",
            **root, "$defs": defs}


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props = {}
    for f in fields(cls):
        prop = _type_schema(hints[f.name], defs)
        if "choices" in f.metadata:
            nullable = type(None) in typing.get_args(hints[f.name])
            prop["enum"] = [*f.metadata["choices"], *([None] if nullable else [])]
        if f.default is not MISSING:
            prop["default"] = to_dict(f.default)
        elif f.default_factory is not MISSING and not dataclasses.is_dataclass(hints[f.name]):
            prop["default"] = to_dict(f.default_factory())
        if f.metadata.get("help"):
            prop["description"] = f.metadata["help"]
        props[f.name] = prop
    return {"type": "object", "properties": props, "additionalProperties": False}


def _type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return {"anyOf": [_type_schema(arg, defs) for arg in typing.get_args(tp)]}
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {"description": " ".join(tp.__doc__.split("\n\n")[0].split()),
                                 **_object_schema(tp, defs)}
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if origin is list:
        return {"type": "array", "items": _type_schema(typing.get_args(tp)[0], defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(typing.get_args(tp)[1], defs)}
    return {"type": _JSON_TYPES[tp]}
