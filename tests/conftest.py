"""Helpers shared by the tests: free ports, waiting for servers, and finding (and stopping) the
processes a test started, by their process session, so that a test stops only what it started;
and the ``s3`` fixture: a real S3 server (moto, checking credentials) for the store's S3 tests."""
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent  # the venv's console scripts (ray, mlflow, ptmdd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (e.g. 401 without a token): it is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def session_pids(session: int, name: str | None = None) -> list[int]:
    """PIDs of the processes of ``session`` (whose command line contains ``name``, if given): the
    servers a test starts run in a session of their own, which Ray's daemons and workers inherit, so
    a test finds and stops its own processes and leaves any other Ray on the machine alone."""
    cmd = ["pgrep", "-s", str(session)] + (["-f", name] if name else [])
    return [int(p) for p in subprocess.run(cmd, capture_output=True, text=True).stdout.split()]


def listening(session: int) -> dict[str, str]:
    """{address:port: process name} of every TCP socket listened on by a process of ``session``
    (from /proc: the sockets each process holds, looked up in /proc/net/tcp and tcp6)."""
    addrs = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            host, port = f[1].split(":")
            raw = b"".join(bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, len(host), 8))
            addrs[f[9]] = (ipaddress.ip_address(raw), int(port, 16))
    out = {}
    for pid in session_pids(session):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # it ended meanwhile
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in addrs:
                ip, port = addrs[link[8:-1]]
                out[f"{ip}:{port}"] = name
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def rest(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def stop_session(session: int, grace: float = 10) -> None:
    """SIGTERM every process of ``session``, SIGKILL what is left after ``grace`` seconds."""
    subprocess.run(["pkill", "-TERM", "-s", str(session)], capture_output=True)
    end = time.time() + grace
    while time.time() < end and session_pids(session):
        time.sleep(0.5)
    subprocess.run(["pkill", "-KILL", "-s", str(session)], capture_output=True)


# -- a real S3 server (moto) for the store's S3 tests -------------------------------------------

S3_BUCKET = "ptmdd-test"
S3_REGION = "us-east-1"


class S3Server:
    """A moto S3 server on 127.0.0.1 that checks credentials: it knows one IAM user (``key`` /
    ``secret``, allowed everything) and refuses any other key or a wrong secret."""

    def __init__(self, endpoint: str, key: str, secret: str):
        self.endpoint, self.key, self.secret, self.bucket = endpoint, key, secret, S3_BUCKET

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client (and a subprocess) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": S3_REGION,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, key: str | None = None, secret: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=S3_REGION,
                            aws_access_key_id=key or self.key, aws_secret_access_key=secret or self.secret)


def _start_moto(log_path: Path) -> tuple[subprocess.Popen, S3Server]:
    """moto_server in a process session of its own; an IAM user and the bucket are made while
    moto accepts anything, then it is told to authenticate every request (``reset-auth`` 0)."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(endpoint + "/moto-api/", timeout=60)
    anyone = {"endpoint_url": endpoint, "region_name": S3_REGION, "aws_access_key_id": "setup",
              "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **anyone)
    iam.create_user(UserName="ptmdd")
    key = iam.create_access_key(UserName="ptmdd")["AccessKey"]
    iam.put_user_policy(UserName="ptmdd", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    boto3.client("s3", **anyone).create_bucket(Bucket=S3_BUCKET)
    req = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).close()
    return proc, S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto server for the session (each test takes a prefix of its own in its bucket)."""
    proc, server = None, None
    try:
        proc, server = _start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
        yield server
    finally:
        if proc is not None:
            proc.terminate()  # reaped here, so that stop_session does not wait on a zombie
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            stop_session(proc.pid, grace=2)


class S3Store:
    """A fresh store location on the test server: ``uri``, ``env`` for subprocesses, and raw
    access to its objects behind the store's back (``put``, ``names``)."""

    def __init__(self, server: S3Server, prefix: str):
        self.server, self.prefix = server, prefix
        self.uri = f"s3://{server.bucket}/{prefix}"
        self.env = {**os.environ, **server.env(), "PYTHONWARNINGS": "ignore"}

    def put(self, relative: str, data: bytes) -> None:
        self.server.client().put_object(Bucket=self.server.bucket, Key=f"{self.prefix}/{relative}", Body=data)

    def get(self, relative: str) -> bytes:
        return self.server.client().get_object(Bucket=self.server.bucket, Key=f"{self.prefix}/{relative}")["Body"].read()

    def names(self, under: str = "") -> list[str]:
        """Object keys under the prefix (relative), directory markers left out."""
        start = f"{self.prefix}/{under}"
        pages = self.server.client().get_paginator("list_objects_v2").paginate(Bucket=self.server.bucket, Prefix=start)
        return sorted(o["Key"][len(self.prefix) + 1:] for p in pages for o in p.get("Contents", [])
                      if not o["Key"].endswith("/"))


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """A store location of this test's own on the session's moto server, with the standard AWS_*
    variables set for this process (restored afterwards) and in ``.env`` for subprocesses."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    prefix = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[-60:] + "-" + uuid.uuid4().hex[:8]
    return S3Store(s3_server, prefix)
