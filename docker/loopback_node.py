"""`ray start` for a worker node that joins a head on the same machine and stays on 127.0.0.1.

On Linux, `ray start --node-ip-address=127.0.0.1` replaces the loopback address with the machine's
routable one, so every server of the node listens on all interfaces. With
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's single-machine switch, inherited by every process the node
starts) the node keeps to the loopback, but `ray start --address=...` then refuses to join a head.
This wrapper lifts that refusal in its own process only and keeps the address it is given; the
raylet, agents and workers it starts still read the switch and keep to 127.0.0.1. Used by
docker/local_cluster.sh; on separate machines use plain `ray start --address=HEAD:PORT`.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python docker/loopback_node.py start --address=127.0.0.1:PORT ...
"""
import sys

import ray._private.ray_constants as ray_constants
from ray._private import services

ray_constants.ENABLE_RAY_CLUSTER = True  # let `ray start` join a head (single-machine check)
services.resolve_ip_for_localhost = lambda host: host  # ...at the address given: 127.0.0.1

from ray.scripts.scripts import main  # noqa: E402  (after the two lines above, on purpose)

if __name__ == "__main__":
    sys.exit(main())
