"""Connection limits: admission caps, the periodic sweep that runs every timer, descriptor watch.

Timers are not per connection: one `Sweeper` per server walks the open connections a few times
per timeout period (at most once a second), so 10,000 idle connections cost one pass of integer
comparisons per second, not 10,000 timer handles.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections import Counter
from collections.abc import Callable

from echo_async.config import ServerConfig

# Labels of echo_connections_rejected_total{reason=...}.
REJECT_MAX_CONNECTIONS = "max_connections"
REJECT_MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"

SWEEP_MAX_INTERVAL_S = 1.0
SWEEP_MIN_INTERVAL_S = 0.05


class Admission:
    """Decides whether a new connection may be served; counts open connections per address."""

    def __init__(self, config: ServerConfig) -> None:
        self.max_connections = config.max_connections
        self.max_per_ip = config.max_connections_per_ip
        self.per_ip: Counter[str] = Counter()

    def admit(self, open_connections: int, peer_host: str) -> str | None:
        """None to serve the connection, or the rejection reason."""
        if self.max_connections and open_connections >= self.max_connections:
            return REJECT_MAX_CONNECTIONS
        if self.max_per_ip and peer_host:
            if self.per_ip[peer_host] >= self.max_per_ip:
                return REJECT_MAX_CONNECTIONS_PER_IP
            self.per_ip[peer_host] += 1
        return None

    def release(self, peer_host: str) -> None:
        """A served connection from `peer_host` has closed."""
        if self.max_per_ip and peer_host:
            remaining = self.per_ip[peer_host] - 1
            if remaining > 0:
                self.per_ip[peer_host] = remaining
            else:
                del self.per_ip[peer_host]


def sweep_interval(config: ServerConfig) -> float:
    """A quarter of the shortest timer, clamped to [0.05, 1] seconds."""
    timers = [t for t in (config.idle_timeout, config.max_lifetime) if t > 0]
    if config.proxy_protocol != "off":
        timers.append(config.proxy_header_timeout)
    interval = min(timers) / 4 if timers else SWEEP_MAX_INTERVAL_S
    return max(SWEEP_MIN_INTERVAL_S, min(SWEEP_MAX_INTERVAL_S, interval))


class Sweeper:
    """Calls `tick()` every `interval` seconds on the running loop until `stop()`.

    A timer chain (call_later), not a task: nothing to await at shutdown, and `stop()` cancels
    the one pending handle.
    """

    def __init__(self, interval: float, tick: Callable[[], None]) -> None:
        self.interval = interval
        self._tick = tick
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._run)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        try:
            self._tick()
        finally:
            if self._handle is not None:
                self._handle = asyncio.get_running_loop().call_later(self.interval, self._run)


class DescriptorWatch:
    """Notices when the process runs out of file descriptors, and when it recovers.

    Event loops handle EMFILE on accept differently (uvloop silently accepts and closes the
    excess, asyncio retries every second and reports each failure), so the server probes the
    condition itself: one open() of /dev/null per sweep. `check()` returns "exhausted" or
    "recovered" on a change of state, None otherwise: that makes the log once per episode.
    """

    def __init__(self) -> None:
        self.exhausted = False
        self.episodes = 0

    def check(self) -> str | None:
        try:
            probe = os.open(os.devnull, os.O_RDONLY)
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE) and not self.exhausted:
                self.exhausted = True
                self.episodes += 1
                return "exhausted"
            return None
        os.close(probe)
        if self.exhausted:
            self.exhausted = False
            return "recovered"
        return None
