"""The MLflow UI on a real study's tracking store, in a real browser (Debian's headless Chromium
driven by Selenium through the system chromedriver): what the store holds is only useful if the UI
shows it, so the runs page, the child runs named by grid point and the parent's summary metrics are
checked where a person would look for them, and screenshots of each page are kept."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import free_port, stop_server, stop_session, wait_http
from helpers import STUDY

CHROMEDRIVER = Path("/usr/bin/chromedriver")  # Debian's chromium-driver (bash .ci/setup installs it)
ML = "workflowType=machine_learning"  # the UI's "Model training" mode (its default is GenAI)
CHILDREN = ["clom=0 #0", "clom=30 #0"]  # the grid points of STUDY's sweep, sample 0
LINK = re.compile(r"^runs of this study:\s+http://127\.0\.0\.1:5000/#/experiments/(\d+)/runs\?" + ML + r"\s*$", re.M)
PNG = b"\x89PNG\r\n\x1a\n"
WAIT = 60  # seconds for a page to show what is awaited (the machine may be busy)


def _run_study(tmp_path: Path) -> tuple[Path, str]:
    """Run STUDY for real (~1 min) and return its MLflow database and the experiment id, parsed from
    the link the closing table prints (the link a person would follow)."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "study", str(path), "--results", str(results),
                           "--store", str(tmp_path / "store"), "--quiet"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = LINK.search(proc.stdout)
    assert found, proc.stdout[-3000:]
    db = results / "mlflow.db"
    assert db.is_file()
    return db, found.group(1)


def _parent_run(db: Path, experiment: str):
    """The study's parent run (tag ptmdd.role == "study"), read with MLflow's own client."""
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{db}").search_runs([experiment], "tags.`ptmdd.role` = 'study'")
    assert len(runs) == 1 and runs[0].info.run_name == STUDY["name"], runs
    return runs[0]


def _start_ui(db: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow ui`` on the study's database, on a free loopback port, in a process session of its
    own (so that the test stops exactly it and its workers). One worker and no job runner: the
    UI needs neither more workers nor MLflow's background jobs (a handful of huey consumers),
    and the machine's few cores are busy."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
                                 f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                cwd=db.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _browser(tmp_path: Path):
    """Headless Chromium through Debian's chromedriver, given by path so that Selenium Manager (which
    would download a driver) never runs; chromedriver and its browser in a process session of their
    own, for :func:`_quit` to stop whatever ``quit()`` leaves."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--no-first-run"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"),
                                      popen_kw={"start_new_session": True})
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT)
    return driver


def _quit(driver) -> None:
    """Quit the browser, then stop anything left in chromedriver's session."""
    pid = driver.service.process.pid
    try:
        driver.quit()
    finally:
        stop_session(pid, grace=5)


def _text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _wait_text(driver, *needles: str) -> str:
    """Wait until every needle is in the page's visible text; return that text."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT).until(lambda d: all(n in _text(d) for n in needles),
                                      f"not in the page: {needles}")
    return _text(driver)


def _screenshot(driver, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert len(data) > len(PNG) and data.startswith(PNG), path


def _by_text(driver, text: str):
    """The displayed element whose own text is exactly ``text`` (found by what a person reads)."""
    from selenium.webdriver.common.by import By

    shown = [e for e in driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']") if e.is_displayed()]
    assert shown, f"{text!r} is not shown"
    return shown[0]


def _check_runs_page(driver, base: str, experiment: str, parent: str, screens: Path) -> None:
    """The study's link opens the runs table in "Model training" mode (not GenAI's traces
    overview); the parent run ``tiny`` is a collapsed row whose expander (an icon-only button
    in its name cell, with no text or label) shows the children named by grid point."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{base}/#/experiments/{experiment}/runs?{ML}")
    text = _wait_text(driver, "Run Name", "matching runs")
    assert "Evaluation runs" not in text and "Observability" not in text, text  # GenAI's sidebar
    link = WebDriverWait(driver, WAIT).until(
        lambda d: d.find_element(By.XPATH, f"//a[contains(@href, '/runs/{parent}')]"))
    assert link.text == STUDY["name"]
    if not all(c in _text(driver) for c in CHILDREN):  # nested runs start collapsed
        link.find_element(By.XPATH, "ancestor::*[.//button][1]//button").click()
    text = _wait_text(driver, *CHILDREN)
    rows = text[text.index("Run Name"):]
    assert rows.index(STUDY["name"] + "\n") < min(rows.index(c) for c in CHILDREN), rows  # under the parent
    assert "3 matching runs" in text
    for child in CHILDREN:
        _by_text(driver, child)
    _screenshot(driver, screens / "runs.png")


def _check_parent_page(driver, base: str, experiment: str, parent: str, best: float, screens: Path) -> None:
    """The parent run's page lists best.acc.mean (with its value) in its Metrics section, and its
    child runs by name."""
    driver.get(f"{base}/#/experiments/{experiment}/runs/{parent}?{ML}")
    text = _wait_text(driver, "Metrics (", "best.acc.mean", "Child runs")
    metrics = text[text.index("Metrics ("):text.index("Parameters (")]
    lines = metrics.splitlines()
    assert "best.acc.mean" in lines, metrics
    assert float(lines[lines.index("best.acc.mean") + 1]) == pytest.approx(best, abs=1e-3), metrics
    children = text[text.index("Child runs"):]
    assert all(c in children for c in CHILDREN), children
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", _by_text(driver, "best.acc.mean"))
    _screenshot(driver, screens / "parent.png")


@pytest.mark.slow
def test_mlflow_ui_shows_the_study_runs_in_a_real_browser(tmp_path, monkeypatch):
    pytest.importorskip("selenium")
    if not CHROMEDRIVER.is_file():
        pytest.skip("no chromedriver (bash .ci/setup installs Debian's chromium chromium-driver)")
    # should Selenium ever look for a driver itself, it fails here instead of downloading one
    monkeypatch.setenv("SE_MANAGER_PATH", str(tmp_path / "no-selenium-manager"))
    db, experiment = _run_study(tmp_path)
    run = _parent_run(db, experiment)
    parent, best = run.info.run_id, run.data.metrics["best.acc.mean"]
    screens = tmp_path / "screens"
    proc, base = _start_ui(db, tmp_path / "mlflow-ui.log")
    try:
        wait_http(base + "/health")
        driver = _browser(tmp_path)
        try:
            _check_runs_page(driver, base, experiment, parent, screens)
            _check_parent_page(driver, base, experiment, parent, best, screens)
        finally:
            _quit(driver)
    finally:
        stop_server(proc)
