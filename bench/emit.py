"""How a benchmark script hands over its figures: one JSON object on stdout with ``--json`` (its
table went to stderr), and the same object in ``--out FILE`` (the files BENCHMARKS.md cites)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], as_json: bool, out: str | None, indent: int | None = None) -> None:
    text = json.dumps(result, indent=indent)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    if as_json:
        print(text, flush=True)
