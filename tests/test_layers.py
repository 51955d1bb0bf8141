"""The package's layers: no import circle, no import from a lower layer back up, and the light
layers (the config, the study spec, the reports) import without torch.

Imports are read from the source with ``ast``, function-local ones included, so a lazy import
cannot hide a circle. Only ``if TYPE_CHECKING:`` blocks are skipped: they never run (they are how
:mod:`ptmdd_ray.sources` names the config's ``DatasetConfig`` in annotations). Importing a
submodule (``ptmdd_ray.config._sections``) from outside its package also runs the package's
``__init__``, so it counts as importing the package too.

A new module goes into :data:`LAYERS`, at the lowest layer above everything it imports.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ptmdd_ray"

# Low -> high. A module imports only from its own layer (without a circle) or lower ones.
# Names are top-level modules of ptmdd_ray; a package (config) is one entry, its submodules included.
LAYERS: list[tuple[str, list[str]]] = [
    ("light: no torch", ["__init__", "errors", "archs", "sources", "config", "search", "s3", "proc", "stats", "cost"]),
    ("study specs and reports: no torch", ["study_spec", "rows", "cost_report", "search_report", "report"]),
    ("torch building blocks and storage", ["augment", "losses", "models", "compiled", "store", "artifacts"]),
    ("tensors and training", ["data", "train", "grouped", "synthetic"]),
    ("distillation, the PTM pool, evaluation", ["methods", "pool", "experts", "evaluate", "baseline"]),
    ("jobs and services", ["pipeline", "service", "tracking"]),
    ("studies", ["study"]),
    ("command line", ["cli"]),
]

# Edges that break a rule today and that an open change removes; delete an entry when it lands
# (the test fails on an entry whose import is gone, so this list cannot go stale).
PENDING: dict[tuple[str, str], str] = {
}


def layer_of() -> dict[str, int]:
    return {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package by its ``__init__``)."""
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _import_nodes(tree: ast.AST):
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _import_nodes_of(child))
            continue
        yield from _import_nodes_of(node)


def _import_nodes_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from _import_nodes(node)


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports."""
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:  # ``import ptmdd_ray.x.y`` of a name inside x
                target = target.rpartition(".")[0]
            if not target:
                continue
            out.add(target)
            parent = target.rpartition(".")[0]
            while parent.startswith("ptmdd_ray.") and not name.startswith(parent + "."):
                out.add(parent)  # running a submodule runs its package first
                parent = parent.rpartition(".")[0]
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def top(name: str) -> str:
    """The LAYERS name of a module: ``ptmdd_ray.config._checks`` -> ``config``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def pending_removed(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    return {a: {b for b in bs if (top(a), top(b)) not in PENDING} for a, bs in edges.items()}


def test_every_module_has_a_layer_and_every_layer_entry_a_module():
    layers, names = layer_of(), {top(m) for m in modules()}
    unplaced = sorted(names - set(layers))
    assert not unplaced, (f"ptmdd_ray modules in no layer: {unplaced}. Add each to LAYERS in tests/test_layers.py, "
                          "at the lowest layer above everything it imports")
    gone = sorted(set(layers) - names)
    assert not gone, f"LAYERS names modules that do not exist: {gone}; remove them from tests/test_layers.py"
    assert len(layers) == sum(len(ns) for _, ns in LAYERS), "a module is listed in two layers"


def test_no_import_circle():
    cycle = find_cycle(pending_removed(graph()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_from_a_higher_layer():
    layers = layer_of()
    bad = sorted(f"{a} (layer {layers[top(a)]}) imports {b} (layer {layers[top(b)]})"
                 for a, bs in pending_removed(graph()).items() for b in bs
                 if top(a) in layers and top(b) in layers and layers[top(b)] > layers[top(a)])
    assert not bad, "imports back up the layers:\n" + "\n".join(bad)


def test_pending_exceptions_still_exist():
    tops = {(top(a), top(b)) for a, bs in graph().items() for b in bs}
    gone = sorted(edge for edge in PENDING if edge not in tops)
    assert not gone, f"PENDING entries whose import is gone (remove them from tests/test_layers.py): {gone}"


def test_the_graph_sees_function_local_and_package_imports():
    edges = graph()
    assert "ptmdd_ray.sources" in edges["ptmdd_ray.data"]
    assert "ptmdd_ray.config._sections" in edges["ptmdd_ray.config._checks"]
    assert "ptmdd_ray.study" in edges["ptmdd_ray.cli"]  # cli imports study inside its command functions
    assert "ptmdd_ray.config" not in edges["ptmdd_ray.sources"]  # an annotation-only import


def test_the_light_layers_import_without_torch():
    light = [f"ptmdd_ray.{m}" if m != "__init__" else "ptmdd_ray" for _, names in LAYERS[:2] for m in names]
    code = (f"import sys\nimport {', '.join(light)}\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'ray'))\n"
            "assert not heavy, heavy[:5]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_following_the_config_through_run_distill_takes_at_most_26_moves(tmp_path):
    """Issue 15's yardstick, measured on a real run by bench/reading_path.py: the reader who follows
    the config from run_distill changes file at most ~25 times (down and back up); 26 since the
    methods became a package (issue 26), where the loop hands the config to the method's module."""
    sys.path.insert(0, str(ROOT / "bench"))
    import reading_path
    from ptmdd_ray.config import build_config
    from ptmdd_ray.pipeline import run_distill

    cfg = build_config({**reading_path.TINY, "store": str(tmp_path / "store")})
    tree = reading_path.call_tree(run_distill, cfg, tmp_path / "out", progress=False)
    path, moves, back = reading_path.walk(tree)
    read = {name for _, name in reading_path.functions(tree)}
    assert {"run_distill", "resolve_pool", "distill", "evaluate_against_baseline", "write_outputs"} <= read
    assert "CheckpointStore.save" not in read  # the store's internals are not on the config's path
    assert moves <= 26, " -> ".join(path)
    assert back == moves // 2  # every move down comes back up: the reader ends where it started


def test_the_reading_path_counts_moves_down_and_back_up():
    sys.path.insert(0, str(ROOT / "bench"))
    from reading_path import walk

    leaf = lambda f, n: (f, n, [])  # noqa: E731
    tree = ("a.py", "main", [leaf("a.py", "helper"), ("b.py", "load", [leaf("c.py", "read"), leaf("b.py", "check")]),
                             leaf("b.py", "save")])
    path, moves, back = walk(tree)
    assert path == ["a.py", "b.py", "c.py", "b.py", "a.py", "b.py", "a.py"]
    assert (moves, back) == (6, 3)
