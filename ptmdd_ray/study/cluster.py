"""The Ray cluster a study runs on: its address checked in seconds, joined (or a local Ray started)."""
from __future__ import annotations

import os

from ..config import ConfigError


def check_address(address: str | None) -> None:
    """An ``--address`` (or ``RAY_ADDRESS``) with no cluster behind it is a one-line ConfigError,
    found out in seconds (a TCP probe) rather than after Ray's minute of retries."""
    import socket

    address = address or os.environ.get("RAY_ADDRESS")
    host_port = (address or "").split("://", 1)[-1].rstrip("/")
    if not address or address == "auto" or ":" not in host_port:
        return
    host, port = host_port.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"address: no Ray cluster at {address} ({getattr(e, 'strerror', None) or e})") from None


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, set inside a ``ray job``), else start
    a local Ray on 127.0.0.1."""
    import ray

    from ..service import init_local_ray, keep_to_loopback

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return init_local_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "::1"):
        keep_to_loopback()  # a cluster on this machine's loopback: the driver's node is 127.0.0.1 too
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"address: cannot join the Ray cluster at {address} ({str(e).splitlines()[0]})") from None

