"""REPRODUCTION.md's verdict table is what the committed per-trial rows give today: a reviewer
re-derives it with `python bench/verdicts.py`, and a change to the statistics, the rows or the
document that makes them disagree fails here."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- verdicts:begin (python bench/verdicts.py) -->", "<!-- verdicts:end -->"  # as bench/verdicts.py


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


def test_verdicts_write_replaces_only_the_marked_block(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("verdicts", ROOT / "bench" / "verdicts.py")
    verdicts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verdicts)
    doc = tmp_path / "R.md"
    doc.write_text(f"before\n{BEGIN}\nold table\n{END}\nafter\n")
    verdicts.write_into(doc, "| new |")
    assert doc.read_text() == f"before\n{BEGIN}\n| new |\n{END}\nafter\n"
    doc.write_text("no markers")
    import pytest

    with pytest.raises(SystemExit, match="no verdict markers"):
        verdicts.write_into(doc, "x")


def test_the_findings_by_data_set_agree_with_the_verdict_table():
    """The hand-arranged table of findings per data set quotes the verdict table: each cell's
    difference, adjusted p (to its last printed digit) and verdict must be a claim row of its study."""
    doc = (ROOT / "REPRODUCTION.md").read_text()
    arranged = doc.split("### The findings on each data set", 1)[1].split("\n## ", 1)[0]
    derived = subprocess.run([sys.executable, str(ROOT / "bench" / "verdicts.py")], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout
    claims = [[c.strip() for c in line.strip("|").split("|")] for line in derived.splitlines()[2:]]
    cells = re.findall(r"`(\w+)`: ([+−-]\d+\.\d+), p ([\d.]+), \*\*([a-z ]+)\*\*", arranged)
    assert len(cells) >= 10, "the findings table lost its cells"
    for study, diff, p, verdict in cells:
        diff = diff.replace("−", "-")
        unit = 10.0 ** -len(p.split(".")[1])
        match = [c for c in claims if c[0] == study and c[5].startswith(diff + " ")
                 and abs(float(c[7].split()[0]) - float(p)) <= unit and c[8].strip("*").startswith(verdict)]
        assert match, f"{study}: {diff}, p {p}, {verdict} is no claim of the verdict table"
