"""REPRODUCTION.md's verdict table is what the committed per-trial rows give today: a reviewer
re-derives it with `python bench/verdicts.py`, and a change to the statistics, the rows or the
document that makes them disagree fails here."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- verdicts:begin (python bench/verdicts.py) -->", "<!-- verdicts:end -->"


def test_the_verdict_table_is_re_derived_from_the_committed_rows():
    doc = (ROOT / "REPRODUCTION.md").read_text()
    assert BEGIN in doc and END in doc, "REPRODUCTION.md lost its verdict markers"
    shown = doc.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    derived = subprocess.run([sys.executable, str(ROOT / "bench" / "verdicts.py")], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout.strip()
    assert shown == derived
    studies = {p.stem for p in (ROOT / "bench" / "repro" / "rows").glob("*.parquet")}
    assert studies, "no rows committed under bench/repro/rows"
    assert {m for m in re.findall(r"^\| (\w+) \|", derived, flags=re.M)} - {"study"} == studies  # every file shown


def test_every_rows_file_names_a_study_file_and_its_commit():
    from ptmdd_ray.rows import read_rows

    for path in (ROOT / "bench" / "repro" / "rows").glob("*.parquet"):
        run = read_rows(path)
        assert (ROOT / "bench" / "repro" / "studies" / f"{path.stem}.yaml").exists(), path
        assert run.study == path.stem and run.rows
        assert all(len(r["commit"]) == 40 for r in run.rows), path  # the code each trial ran
