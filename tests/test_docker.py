"""docker/ cannot run here (no Docker engine): check that its files parse and say what they must."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_yaml_under_docker_and_studies_parses():
    files = sorted((ROOT / "docker").glob("*.yaml")) + sorted((ROOT / "studies").glob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        assert isinstance(yaml.safe_load(f.read_text()), dict), f


def test_compose_publishes_ports_on_loopback_only_and_has_the_services():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert {"ray-head", "ray-worker", "mlflow", "postgres", "minio"} <= set(compose["services"])
    for svc in compose["services"].values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    gpu = compose["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert "postgresql://" in compose["services"]["mlflow"]["command"]


def test_rayjob_runs_a_study_on_the_pinned_ray_with_token_auth():
    job = yaml.safe_load((ROOT / "docker" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("ptmdd study studies/")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in env
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in dockerfile
