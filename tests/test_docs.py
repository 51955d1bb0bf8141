"""The documents point at tests that exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_named_in_reliability_md_exists():
    text = (ROOT / "RELIABILITY.md").read_text()
    named = re.findall(r"`(tests/\w+\.py)(?:::(\w+))?", text)
    assert len(named) >= 20
    for path, name in named:
        source = (ROOT / path).read_text()
        if name:
            assert f"def {name}(" in source, f"{path}::{name}"
    for name in re.findall(r"`(test_\w+)(?:\[|`)", text):  # bare names refer to the file named before them
        assert any(f"def {name}(" in p.read_text() for p in (ROOT / "tests").glob("test_*.py")), name
