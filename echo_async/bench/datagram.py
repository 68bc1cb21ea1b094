"""The UDP bench client: datagram pingpong, with loss detected by timeout."""

from __future__ import annotations

import asyncio
from collections import deque
from time import perf_counter_ns
from typing import cast

from echo_async.bench import pattern
from echo_async.bench.counters import Counters, describe


class DatagramClient(asyncio.DatagramProtocol):
    """UDP pingpong: one datagram in flight; a lost one is an error after ``timeout``.

    Echoes of datagrams already given up on are recognised and ignored rather than counted as
    mismatches.
    """

    __slots__ = (
        "closed",
        "closing",
        "counters",
        "given_up",
        "index",
        "payload",
        "pool",
        "sent_at",
        "size",
        "transport",
        "turn",
    )

    def __init__(self, counters: Counters, index: int, size: int) -> None:
        self.counters = counters
        self.index = index
        self.size = size
        self.pool = pattern.messages(size)
        self.turn = index % len(self.pool)
        self.payload = b""
        self.sent_at = 0
        self.given_up: deque[bytes] = deque(maxlen=16)
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.counters.connections_open += 1
        self.counters.connections_made += 1
        self._send(perf_counter_ns())

    def _send(self, now: int) -> None:
        counters = self.counters
        if counters.budget <= 0 or self.transport.is_closing():
            self.sent_at = 0
            return
        counters.budget -= 1
        self.turn = (self.turn + 1) % len(self.pool)
        self.payload = self.pool[self.turn]
        self.sent_at = now
        self.transport.sendto(self.payload)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if not self.sent_at or data != self.payload:
            if data in self.given_up:
                return
            if not self.sent_at:
                self.counters.mismatch(len(data), f"socket {self.index}: unsolicited datagram")
                return
            self.counters.mismatch(
                pattern.differences(data, self.payload)[0],
                f"socket {self.index}: datagram of {len(data)} bytes differs from the "
                f"{len(self.payload)} sent",
            )
        now = perf_counter_ns()
        counters = self.counters
        counters.latency.record(now - self.sent_at)
        counters.round_trips += 1
        counters.echoed_bytes += len(data)
        if counters.round_trips >= counters.target:
            counters.finished.set()
        self._send(now)

    def error_received(self, exc: Exception) -> None:
        # Typically ICMP port unreachable: nothing will come back, so stop waiting; the next
        # tick sends again instead of spinning on a dead port.
        self.counters.error(describe(exc))
        if self.sent_at:
            self._lose()
        self.sent_at = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.counters.connections_open -= 1
        if not self.closing and not self.counters.stopping and exc is not None:
            self.counters.error(describe(exc))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        """Close without counting an error."""
        self.closing = True
        self.transport.close()

    def tick(self, now: int, timeout_ns: int) -> None:
        """Called every tick by the driver: count an overdue datagram as lost, send the next."""
        if self.sent_at and now - self.sent_at > timeout_ns:
            self.counters.error(f"datagram lost (no echo within {timeout_ns / 1e9:g}s)")
            self._lose()
            self._send(now)
        elif not self.sent_at:
            self._send(now)

    def _lose(self) -> None:
        """Give up on the datagram in flight: remember it (a late echo is no mismatch) and
        return it to the --requests budget.
        """
        self.given_up.append(self.payload)
        self.counters.budget += 1
