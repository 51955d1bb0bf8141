"""Helpers shared by the tests (imported as ``from helpers import ...``; the fixtures that use them
are in conftest.py): free ports, waiting for servers, finding and stopping the processes a test
started by their process session (so that a test stops only what it started), the tiny core config
and study many tests run, a real S3 server (moto) and a real PostgreSQL server."""

import glob
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


BIN = Path(sys.executable).parent  # the venv's console scripts (ray, mlflow, ptmdd)

# The core config of the tests' studies: digits at 8 px, 10 DM iterations, a one-PTM pool, 2 eval
# models x 20 epochs, 10 validation images per class: a trial in seconds, with every part of a real one.
TINY_BASE = {"dataset": {"name": "digits", "im_size": 8, "val_per_class": 10}, "model": "ConvNetW32",
             "distill": {"method": "dm", "ipc": 1, "iterations": 10, "batch_real": 32},
             "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 2}, "pretrain": {"batch": 128},
             "eval": {"runs": 2, "epochs": 20}}


# The tiny study many tests run (a sweep, a search space, a claim) on TINY_BASE.
STUDY = {
    "metric": "val.acc.mean",
    "name": "tiny",
    "base": TINY_BASE,
    "sweep": {"loss.clom": {"grid": [0.0, 30.0]}},
    "search": {"loss.clom": {"loguniform": [1.0, 100.0]}, "loss.cclom": {"uniform": [0.0, 1.0]}},
    "samples": 1,
    "max_concurrent": 2,
    "matrix": "loss.clom",
    "control": {"loss.clom": 0.0},
    "claims": [{"claim": "CLoM helps", "better": {"loss.clom": 30.0}, "than": "control"}],
}


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


def stop_server(proc: subprocess.Popen, wait: float = 10) -> None:
    """Stop a server started in a session of its own: the server first (it stops its workers, and
    reaping it keeps a zombie from holding the session open), then whatever is left of the session."""
    proc.terminate()
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        pass
    stop_session(proc.pid, grace=5)
    proc.wait()


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


def start_moto(log_path: Path) -> tuple[subprocess.Popen, S3Server]:
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


def together(code: str, *args, n: int = 3, timeout: float = 120) -> list[tuple[int, str, str]]:
    """Run ``code`` in ``n`` processes that do their imports, then wait for one "go" (a line on
    stdin) so that they run the racing part at the same moment; (returncode, stdout, stderr) each."""
    procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.communicate()[1][-2000:]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server's bin directory (Debian: /usr/lib/postgresql/<major>/bin),
    found by glob so that any major version does; None when no server is installed."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")]
    if not found and shutil.which("postgres"):
        found = [Path(shutil.which("postgres")).parent]
    return max(found, key=lambda d: [int(x) for x in d.parent.name.split(".") if x.isdigit()] or [0]) if found else None


@dataclass
class Postgres:
    """A PostgreSQL server the test session started: on 127.0.0.1:``port`` only (its Unix socket
    in a private directory), password authentication (scram-sha-256) for ``user``/``password``, in
    a process session of its own (``session``, for :func:`session_pids` / :func:`listening`)."""
    host: str
    port: int
    user: str
    password: str
    data_dir: Path
    session: int

    def url(self, database: str = "postgres", password: str | None = None, scheme: str = "postgresql") -> str:
        """``postgresql://user:password@127.0.0.1:port/database`` (SQLAlchemy, MLflow and Optuna
        take it as it is); ``password`` overrides the real one (to test a refused login)."""
        return f"{scheme}://{self.user}:{self.password if password is None else password}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=database, connect_timeout=5)

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database (named ``name`` or a fresh random name); returns its URL."""
        name = name or f"t_{secrets.token_hex(6)}"
        conn = self.connect()
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)


def as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the ``postgres`` user
    (setpriv execs in place, so the server keeps the pid and session it was started with)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]


def start_postgres(bindir: Path, prefix: list[str]) -> tuple[Postgres, subprocess.Popen, Path]:
    """``initdb`` into a temporary directory, then the server on a free port bound to 127.0.0.1 only
    (``-h 127.0.0.1 -k <private socket dir>``) in a process session of its own, password auth on the
    loopback. Returns the server, its process and its root directory (for :func:`stop_postgres`)."""
    root = Path(tempfile.mkdtemp(prefix="ptmdd-pg-"))
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir(mode=0o700)
    password = secrets.token_urlsafe(16)
    (root / "pwfile").write_text(password + "\n")
    if prefix:  # the server's own user must own its directory (and nobody else may read it)
        owner = pwd.getpwnam("postgres")
        for p in (root, sock, root / "pwfile"):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    os.chmod(root, 0o700)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    init = subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "ptmdd", f"--pwfile={root / 'pwfile'}",
                           "--auth-host=scram-sha-256", "--auth-local=peer", "--encoding=UTF8", "--no-locale",
                           "--no-sync"], env=env, capture_output=True, text=True, timeout=120)
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {init.stderr[-2000:]}")
    (root / "pwfile").unlink()
    port = free_port()
    with open(log, "wb") as out:
        # a throwaway test server: no fsync; enough connections for two drivers, their trials and
        # an MLflow server at once
        server = subprocess.Popen([*prefix, str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-k", str(sock),
                                   "-p", str(port), "-c", "fsync=off", "-c", "synchronous_commit=off",
                                   "-c", "full_page_writes=off", "-c", "max_connections=200"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Postgres("127.0.0.1", port, "ptmdd", password, data, server.pid), server, root


def wait_postgres(pg: Postgres, server: subprocess.Popen, root: Path, timeout: float = 60) -> None:
    import psycopg2

    end = time.time() + timeout
    while True:
        try:
            pg.connect().close()
            return
        except psycopg2.OperationalError:
            if server.poll() is not None or time.time() > end:
                raise RuntimeError(f"PostgreSQL did not start: {(root / 'server.log').read_text()[-2000:]}") from None
            time.sleep(0.2)


def stop_postgres(bindir: Path, prefix: list[str], server: subprocess.Popen, root: Path) -> None:
    """``pg_ctl stop -m fast``, then whatever is left of its session; the directory removed."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "stop", "-D", str(root / "data"), "-m", "fast", "-w", "-t", "30"],
                   env=env, capture_output=True, timeout=60)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    stop_session(server.pid)
    server.wait()
    shutil.rmtree(root, ignore_errors=True)
