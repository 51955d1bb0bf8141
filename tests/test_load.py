"""Load (slow, ~5 min): a 100-trial study on the local Ray records every trial exactly once in
MLflow and the store serves 50 concurrent pool requests; the figures come from the same script,
``bench/bench_load.py``, which prints them."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_hundred_trial_study_and_fifty_concurrent_pool_requests(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_load.py"), "--trials", "100", "--requests", "50",
                           "--out", str(tmp_path / "load")], capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.rindex("\n{\n") + 1:])  # the JSON the script prints last
    study = report["study"]
    assert study["trials"] == study["finished_runs"] == study["distinct_trials"] == 100 and study["errors"] == 0
    assert study["ptm_trainings"] == 2 and study["ptm_hits"] == 198  # 100 trials x 2 PTMs, 2 trained
    assert math.isfinite(study["trials_per_minute"]) and study["trials_per_minute"] > 0
    assert study["hit_rate"] == pytest.approx(198 / 200)
    requests = report["store_requests"]
    # fifty requests at once for two missing PTMs, as trials make them: two trainings, every one served
    assert requests["requests"] == 50 and requests["trainings"] == 2
    for which in ("cold", "warm"):  # latency percentiles of the cold (training) and warm (cached) rounds
        lat = requests[which]
        assert set(lat) == {"p50_ms", "p90_ms", "p99_ms", "max_ms"}, lat
        assert all(math.isfinite(v) and v > 0 for v in lat.values()) and lat["p50_ms"] <= lat["max_ms"], lat
