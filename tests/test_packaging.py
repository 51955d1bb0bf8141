"""The package declares what it imports, and the tested set (constraints.txt) fits the declared ranges."""
import ast
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "botocore": "boto3"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> list[Requirement]:
    project = _project()
    extras = [r for reqs in project["optional-dependencies"].values() for r in reqs]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def _imported_top_level_names() -> set[str]:
    names = set()
    for path in (ROOT / "ptmdd_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"ptmdd_ray", "__future__"}


def test_every_third_party_import_is_declared():
    declared = {canonicalize_name(r.name) for r in _requirements()}
    missing = {n for n in _imported_top_level_names() if canonicalize_name(DISTRIBUTION.get(n, n)) not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_mlflow_optuna_and_ray_are_bounded_below_their_next_major_version():
    for req in _requirements():
        if req.name in ("mlflow", "optuna", "ray"):
            upper = [s for s in req.specifier if s.operator == "<"]
            assert upper, f"{req.name} has no upper bound"
            assert not req.specifier.contains("99"), req


def test_the_constraints_pin_every_declared_dependency_inside_its_range():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    for req in _requirements():
        if req.name == "optuna-dashboard":  # the optional UI: not part of the tested set
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"


def test_ci_setup_installs_from_the_constraints():
    setup = (ROOT / ".ci" / "setup").read_text()
    installs = [line for line in setup.splitlines() if "pip install" in line and not line.lstrip().startswith("#")
                and "--upgrade pip" not in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
