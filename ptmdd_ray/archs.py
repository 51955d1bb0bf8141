"""Architecture names, parsed without torch: which names :func:`ptmdd_ray.models.build_model` accepts.

Names are parsed, not enumerated: fixed families are listed in :data:`FAMILIES`, and ConvNet
variants (``ConvNetD4``, ``ConvNetW64``, ``ConvNetBN``, ``ConvNetD4W64MP`` ...) are read by one
regex into the options of DC's ConvNet builder. The config checks a name here, before anything
imports torch; :mod:`ptmdd_ray.models` builds the networks from the same parse.
"""
from __future__ import annotations

import re


class ModelSpecError(ValueError):
    """An architecture name or shape argument that :func:`ptmdd_ray.models.build_model` cannot honour."""


# The fixed families of the DC/DSA/DM model zoo; models.py holds a builder for each.
FAMILIES = ("MLP", "LeNet", "AlexNet", "AlexNetBN", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN", "ResNet18BN_AP")

_CONVNET_RE = re.compile(r"^ConvNet(?:D(\d+))?(?:W(\d+))?(BN|IN|LN|GN|NN)?(AP|MP|NP)?"
                         r"(Sigmoid|Relu|LeakyRelu)?$")
_NORM_TOKENS = {"BN": "batchnorm", "IN": "instancenorm", "LN": "layernorm", "GN": "groupnorm",
                "NN": "none"}
_POOL_TOKENS = {"AP": "avgpooling", "MP": "maxpooling", "NP": "none"}
_ACT_TOKENS = {"Sigmoid": "sigmoid", "Relu": "relu", "LeakyRelu": "leakyrelu"}

CONVNET_NAMES = (["ConvNet"] + [f"ConvNetD{d}" for d in (1, 2, 3, 4)]
                 + [f"ConvNetW{w}" for w in (32, 64, 128, 256)]
                 + [f"ConvNet{t}" for t in _NORM_TOKENS] + [f"ConvNet{t}" for t in _POOL_TOKENS]
                 + [f"ConvNet{t}" for t in _ACT_TOKENS])


def convnet_options(name: str) -> dict | None:
    """Parse a ConvNet variant name into the ConvNet builder's keyword options (None if not one)."""
    m = _CONVNET_RE.match(name)
    if m is None:
        return None
    depth, width, norm, pool, act = m.groups()
    opts: dict = {}
    if depth is not None:
        opts["depth"] = int(depth)
    if width is not None:
        opts["width"] = int(width)
    if any(opts.get(k, 1) < 1 for k in ("depth", "width")):
        return None
    if norm:
        opts["norm"] = _NORM_TOKENS[norm]
    if pool:
        opts["pool"] = _POOL_TOKENS[pool]
    if act:
        opts["act"] = _ACT_TOKENS[act]
    return opts


def is_known(name: object) -> bool:
    """True iff :func:`ptmdd_ray.models.build_model` accepts ``name``."""
    return isinstance(name, str) and (name in FAMILIES or convnet_options(name) is not None)


def available() -> list[str]:
    """Canonical names (ConvNet variants may also be combined, e.g. ``ConvNetD4W64``)."""
    return list(CONVNET_NAMES) + list(FAMILIES)
