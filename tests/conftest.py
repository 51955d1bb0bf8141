"""Helpers shared by the tests: free ports, waiting for servers, and finding (and stopping) the
processes a test started, by their process session, so that a test stops only what it started."""
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

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
