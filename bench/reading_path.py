"""How many moves between files a reader makes following one config through ``run_distill``.

The reader starts at :func:`ptmdd_ray.pipeline.run_distill` and reads, depth first, each package
function that is handed the config or one of its sections (``Config``, ``DistillConfig``, ...), the
first time it is called: that is the config's path through the code. Stepping into a function in
another file is a move down; coming back to the caller's file is a move back up. Functions the
config does not reach (tensor helpers, the store's internals) are read with whichever function on
the path calls them, so they cost no move; ``--all`` counts them too (every package function).
The path is taken from a real run (``sys.settrace`` over a tiny DM + CLoM job on digits that
trains its one PTM), so it follows what the config really touches, not what an import list
suggests. A function already read is not read again.

    .venv/bin/python bench/reading_path.py            # the moves, then the path file by file
    .venv/bin/python bench/reading_path.py --all      # every package function, not only the config's
    .venv/bin/python bench/reading_path.py --json     # one JSON object (moves, back_up, files, path, functions)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import tempfile
from pathlib import Path

import ptmdd_ray
from ptmdd_ray.config import build_config
from ptmdd_ray.pipeline import run_distill

PACKAGE = Path(ptmdd_ray.__file__).resolve().parent
TINY = {"dataset": {"name": "digits", "im_size": 8, "val_per_class": 10}, "model": "ConvNetW32",
        "distill": {"method": "dm", "ipc": 1, "iterations": 4, "batch_real": 16},
        "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 1}, "pretrain": {"batch": 128},
        "loss": {"clom": 10.0}, "eval": {"runs": 1, "epochs": 2}}


@functools.lru_cache(maxsize=None)
def _package_file(filename: str) -> str | None:
    """A code object's file relative to the package, or None outside it."""
    if not Path(filename).is_absolute():  # <string>, <frozen ...>: not a file of ours
        return None
    path = Path(filename).resolve()
    return str(path.relative_to(PACKAGE)) if PACKAGE in path.parents else None


def _where(frame) -> tuple[str, str] | None:
    """(file relative to the package, function) for a package frame, else None."""
    file = _package_file(frame.f_code.co_filename)
    return None if file is None else (file, frame.f_code.co_qualname)


def carries_config(frame) -> bool:
    """Whether the called function was handed the config or one of its sections."""
    code = frame.f_code
    for name in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]:
        value = frame.f_locals.get(name)
        if dataclasses.is_dataclass(value) and type(value).__module__.startswith("ptmdd_ray.config"):
            return True
    return False


def call_tree(fn, *args, read=carries_config, **kwargs):
    """Run ``fn`` and return the tree of first calls between the package functions that ``read``
    accepts: ``(file, function, [children])``, each function once, in the order first called. A
    call ``read`` refuses is read with its caller (what it calls attaches to that caller). A call
    made while its function is not yet read (a call from a function ``read`` refused) attaches to the
    nearest read function up the stack."""
    root = ("<caller>", "<caller>", [])
    nodes: dict[tuple[str, str], tuple] = {}

    def parent_of(frame) -> tuple:
        """The node of the nearest read function up the stack (the caller, unless it was not read)."""
        frame = frame.f_back
        while frame is not None:
            where = _where(frame)
            if where is not None and where in nodes:
                return nodes[where]
            frame = frame.f_back
        return root

    def trace(frame, event, arg):  # 'call' events only: no local tracing, so the run stays fast
        where = _where(frame)
        if where is not None and where not in nodes and read(frame):
            nodes[where] = (*where, [])
            parent_of(frame)[2].append(nodes[where])

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        fn(*args, **kwargs)
    finally:
        sys.settrace(previous)
    return root[2][0]


def walk(tree) -> tuple[list[str], int, int]:
    """The files in reading order and the moves: (path, moves, of which back up)."""
    path, moves, back = [tree[0]], 0, 0

    def visit(node):
        nonlocal moves, back
        for child in node[2]:
            if child[0] != path[-1]:
                path.append(child[0])
                moves += 1
            visit(child)
            if node[0] != path[-1]:
                path.append(node[0])
                moves += 1
                back += 1

    visit(tree)
    return path, moves, back


def functions(tree) -> list[tuple[str, str]]:
    """(file, function) of every node, in reading order."""
    out = [(tree[0], tree[1])]
    for child in tree[2]:
        out += functions(child)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every package function, not only the config's path")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config({**TINY, "store": str(Path(tmp) / "store")})
        read = (lambda frame: True) if args.all else carries_config
        tree = call_tree(run_distill, cfg, Path(tmp) / "out", progress=False, read=read)
    path, moves, back = walk(tree)
    figures = {"start": f"{tree[0]}:{tree[1]}", "followed": "every function" if args.all else "the config",
               "moves": moves, "back_up": back, "files": sorted(set(path)), "path": path,
               "functions": [f"{f}:{name}" for f, name in functions(tree)]}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"following {figures['followed']} through {figures['start']}: {moves} moves ({back} back up) "
              f"across {len(figures['files'])} files, {len(figures['functions'])} functions")
        print(" -> ".join(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
