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


def test_servers_bind_to_loopback_unless_a_comment_says_why():
    """README commands start servers on 127.0.0.1; a 0.0.0.0 bind in docker/ (inside a container
    network) always comes with the comment that says where it is published and how it is guarded."""
    readme = (ROOT / "README.md").read_text()
    for line in readme.splitlines():
        if "mlflow server" in line and "--host" in line:
            assert "--host 127.0.0.1" in line, line
        if "ray start --head" in line:
            assert "--dashboard-host=127.0.0.1" in line, line
    for f in sorted((ROOT / "docker").glob("*.yaml")):
        lines = f.read_text().splitlines()
        for i, line in enumerate(lines):
            if "0.0.0.0" in line and not line.lstrip().startswith("#"):
                context = "\n".join(lines[max(0, i - 4):i])
                assert "127.0.0.1" in context or "ClusterIP" in context or "port-forward" in context, (f.name, line)


def test_compose_and_the_local_cluster_script_run_the_same_stack():
    """docker/compose.yaml is docker/local_cluster.sh in containers: a head that takes no trials,
    GPU workers, one bucket `ptmdd` for the store, the studies and MLflow's artifacts, PostgreSQL."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    script = (ROOT / "docker" / "local_cluster.sh").read_text()
    assert "--num-cpus=0 --num-gpus=0" in compose["ray-head"]["command"] and "--num-cpus=0 --num-gpus=0" in script
    assert "--artifacts-destination s3://ptmdd/mlflow" in compose["mlflow"]["command"]
    assert '--artifacts-destination "s3://$BUCKET/mlflow"' in script and "BUCKET=ptmdd" in script
    assert "mc mb --ignore-existing local/ptmdd" in compose["bucket"]["entrypoint"]
    assert "--results s3://ptmdd/studies" in (ROOT / "docker" / "compose.yaml").read_text()
