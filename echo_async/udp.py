"""Datagram echo (RFC 862 over UDP) with reflection and loop protection.

UDP echo is a classic reflection and echo-chargen loop vector (CVE-1999-0103): a spoofed
datagram "from" another service's port makes two servers bounce traffic forever. So a datagram
is never answered when its source port is one of the small services' (7 echo, 13 daytime,
17 qotd, 19 chargen, 37 time) or when it comes from this listener's own address, and each source
address gets a token bucket (`udp_rate` datagrams/s, `udp_burst` at once). Everything dropped is
counted by reason.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections import Counter
from typing import Any

LOOP_PORTS = frozenset({7, 13, 17, 19, 37})
MAX_DATAGRAM = 65507
# Token buckets kept at most; past this, full (idle) buckets are pruned, and if that is not
# enough the table is cleared: spoofed sources can't grow memory without bound.
MAX_SOURCES = 65536

DROP_LOOP_PORT = "loop_port"
DROP_OWN_ADDRESS = "own_address"
DROP_RATE = "rate"
DROP_BACKPRESSURE = "backpressure"
DROP_FAULT = "fault"  # --fault-drop, on purpose


class DatagramEcho(asyncio.DatagramProtocol):
    """Echoes each datagram whole to its sender unless protection says no."""

    def __init__(
        self, rate: float, burst: int, log: Any, drop: float = 0.0, seed: int = -1
    ) -> None:
        self.rate = rate
        self.drop = drop
        self.random = random.Random(seed) if seed >= 0 else random.Random()
        self.burst = float(burst)
        self.log = log
        self.transport: asyncio.DatagramTransport | None = None
        self.own: Any = None
        self.own_wildcard = False
        self.buckets: dict[str, list[float]] = {}
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors = 0
        self.dropped: Counter[str] = Counter()
        self.paused = False
        self.empty_sender: socket.socket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.own = transport.get_extra_info("sockname")
        self.own_wildcard = self.own[0] in ("0.0.0.0", "::")

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams_in += 1
        self.bytes_in += len(data)
        host, port = addr[0], addr[1]
        if port in LOOP_PORTS:
            self._drop(DROP_LOOP_PORT, addr)
            return
        if port == self.own[1] and (self.own_wildcard or host == self.own[0]):
            self._drop(DROP_OWN_ADDRESS, addr)
            return
        if self.rate and not self._take_token(host):
            self._drop(DROP_RATE, addr)
            return
        if self.drop and self.random.random() < self.drop:
            self._drop(DROP_FAULT, addr)
            return
        if self.paused or self.transport is None:
            self._drop(DROP_BACKPRESSURE, addr)
            return
        if data:
            self.transport.sendto(data, addr)
        elif not self._send_empty(addr):
            self._drop(DROP_BACKPRESSURE, addr)
            return
        self.datagrams_out += 1
        self.bytes_out += len(data)

    def _send_empty(self, addr: Any) -> bool:
        # Both loops' transports silently skip empty datagrams, yet an empty datagram is a
        # valid message and its echo is an empty datagram; send it on a duplicate of the socket.
        if self.empty_sender is None:
            assert self.transport is not None
            sock = self.transport.get_extra_info("socket")
            self.empty_sender = socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))
            self.empty_sender.setblocking(False)
        try:
            self.empty_sender.sendto(b"", addr)
        except OSError:
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.empty_sender is not None:
            self.empty_sender.close()
            self.empty_sender = None

    def _take_token(self, host: str) -> bool:
        now = time.monotonic()
        bucket = self.buckets.get(host)
        if bucket is None:
            if len(self.buckets) >= MAX_SOURCES:
                self.prune(now)
            bucket = self.buckets[host] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def prune(self, now: float) -> None:
        """Forget sources whose bucket has refilled: they are indistinguishable from new ones."""
        rate, burst = self.rate, self.burst
        full = [
            h for h, (tokens, last) in self.buckets.items() if tokens + (now - last) * rate >= burst
        ]
        for host in full:
            del self.buckets[host]
        if len(self.buckets) >= MAX_SOURCES:
            self.buckets.clear()

    def _drop(self, reason: str, addr: Any) -> None:
        self.dropped[reason] += 1
        self.log.debug("datagram dropped", reason=reason, peer=f"{addr[0]}:{addr[1]}")

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (a sender that went away): counted, never fatal.
        self.errors += 1

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def summary(self) -> dict[str, Any]:
        """Counters for the shutdown summary record."""
        return {
            "datagrams_in": self.datagrams_in,
            "datagrams_out": self.datagrams_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "dropped": dict(self.dropped),
            "errors": self.errors,
        }
