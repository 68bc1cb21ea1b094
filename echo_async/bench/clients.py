"""The bench clients: one asyncio protocol instance per connection, one class per traffic shape.

Hot path discipline: per chunk, one comparison against the pattern (``bytes == bytes``, a memcmp),
one clock read per completed round trip, one histogram increment, a few integer adds.
Everything else (mismatch details, partial chunks, timers) lives off that path.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from time import perf_counter_ns
from typing import cast

from echo_async.bench import pattern
from echo_async.bench.counters import Counters, describe

SUB_BUCKET_BITS = 8  # must match echo_async.bench.histogram; its record() is inlined below


class Client(asyncio.Protocol):
    """What every TCP client shares: connection accounting and an orderly close.

    ``closed`` resolves when the connection is gone, whoever closed it. An unexpected close
    (not asked for by :meth:`close` and not at the end of the run) counts as an error.
    """

    __slots__ = ("closed", "closing", "counters", "index", "origin", "size", "transport")

    def __init__(self, counters: Counters, index: int, size: int) -> None:
        self.counters = counters
        self.index = index
        self.size = size
        self.origin = pattern.start_position(index)  # pattern position of stream byte 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.counters.connections_open += 1
        self.counters.connections_made += 1
        self.start()

    def connection_lost(self, exc: Exception | None) -> None:
        self.counters.connections_open -= 1
        # Messages that will never come back go back into the --requests budget.
        self.counters.budget += self.unanswered()
        if not self.closing and not self.counters.stopping:
            self.counters.error(describe(exc))
        if not self.closed.done():
            self.closed.set_result(None)

    def start(self) -> None:
        """Begin sending; called once the connection is up."""

    def unanswered(self) -> int:
        """How many messages were sent and not (fully) echoed."""
        return 0

    def close(self) -> None:
        """Close without counting an error."""
        self.closing = True
        self.transport.close()

    def waiting_since(self) -> int | None:
        """perf_counter_ns() of the oldest send still waiting for its echo, or None."""
        return None

    def tick(self, now: int, timeout_ns: int) -> None:
        """Called every tick by the driver: drop the connection if its echo is overdue."""
        waiting = self.waiting_since()
        if waiting is not None and now - waiting > timeout_ns and not self.closing:
            self.counters.error(f"no echo within {timeout_ns / 1e9:g}s")
            self.closing = True
            self.transport.abort()

    def _unexpected(self, data: bytes, offset: int) -> None:
        self.counters.mismatch(
            len(data),
            f"connection {self.index}: {len(data)} bytes echoed that were never sent "
            f"(stream byte {offset})",
        )

    def _compare(self, data: bytes, offset: int) -> None:
        """Count the bytes of ``data`` (at stream ``offset``) that differ from what was sent."""
        expected = pattern.window(self.origin + offset, len(data))
        count, where = pattern.differences(data, expected)
        if count:
            self.counters.mismatch(
                count,
                f"connection {self.index}, stream byte {offset + where}: "
                f"sent 0x{expected[where]:02x}, echoed 0x{data[where]:02x}",
            )


class PingPongClient(Client):
    """Send ``size`` bytes, wait for all of them back, repeat: one message in flight.

    Messages come from a pool shared by the process (:func:`pattern.messages`), each connection
    starting at a different turn, so sending costs no copy. This is the class the headline
    number comes from: a whole message arriving in one chunk takes the inlined path of
    :meth:`data_received`; anything else takes :meth:`_data_in_pieces`.
    """

    __slots__ = ("latency_counts", "next_message", "partial", "payload", "sent_at")

    def __init__(self, counters: Counters, index: int, size: int) -> None:
        super().__init__(counters, index, size)
        self.latency_counts = counters.latency.counts
        pool = pattern.messages(size)
        turn = index % len(pool)
        self.next_message = itertools.cycle(pool[turn:] + pool[:turn]).__next__
        self.payload = b""  # the message in flight; empty when nothing is
        self.partial = 0  # bytes of it already echoed, when it came back in pieces
        self.sent_at = 0  # perf_counter_ns() when it was sent

    def start(self) -> None:
        self._send(perf_counter_ns())

    def _send(self, now: int) -> None:
        counters = self.counters
        if counters.budget <= 0:
            self._out_of_budget()
            return
        counters.budget -= 1
        self.payload = self.next_message()
        self.sent_at = now
        self.transport.write(self.payload)

    def _out_of_budget(self) -> None:
        # Only a --requests run gets here: the last echo of the run arrives on some connection
        # with no budget left, so checking for the end here keeps the check off the hot path.
        self.payload = b""
        if self.counters.round_trips >= self.counters.target:
            self.counters.finished.set()

    def data_received(self, data: bytes) -> None:
        payload = self.payload
        if len(data) != len(payload) or self.partial:
            self._data_in_pieces(data)
            return
        if data != payload:
            self._mismatch(data, 0)
        now = perf_counter_ns()
        latency = now - self.sent_at
        # Histogram.record, inlined: a method call here costs more than the rest of the line.
        exponent = latency.bit_length() - SUB_BUCKET_BITS
        if exponent > 0:
            self.latency_counts[(exponent << (SUB_BUCKET_BITS - 1)) + (latency >> exponent)] += 1
        else:
            self.latency_counts[latency] += 1
        counters = self.counters
        counters.round_trips += 1
        counters.echoed_bytes += len(payload)
        # _send(), inlined for the same reason.
        if counters.budget > 0:
            counters.budget -= 1
            self.payload = payload = self.next_message()
            self.sent_at = now
            self.transport.write(payload)
        else:
            self._out_of_budget()

    def _data_in_pieces(self, data: bytes) -> None:
        """The slow path: a message split over chunks, or chunks spanning messages."""
        counters = self.counters
        while data:
            if not self.payload:
                self._unexpected(data, self.partial)
                return
            partial = self.partial
            piece, data = data[: self.size - partial], data[self.size - partial :]
            if piece != self.payload[partial : partial + len(piece)]:
                self._mismatch(piece, partial)
            self.partial = partial = partial + len(piece)
            counters.echoed_bytes += len(piece)
            if partial < self.size:
                return
            self.partial = 0
            now = perf_counter_ns()
            counters.latency.record(now - self.sent_at)
            counters.round_trips += 1
            self._send(now)

    def _mismatch(self, data: bytes, offset: int) -> None:
        expected = self.payload[offset : offset + len(data)]
        count, where = pattern.differences(data, expected)
        self.counters.mismatch(
            count,
            f"connection {self.index}, message byte {offset + where}: "
            f"sent 0x{expected[where]:02x}, echoed 0x{data[where]:02x}",
        )

    def waiting_since(self) -> int | None:
        return self.sent_at if self.payload else None

    def unanswered(self) -> int:
        return 1 if self.payload else 0


class PipelineClient(Client):
    """Keep ``depth`` messages of ``size`` bytes in flight (pingpong --pipeline, stream), or pace
    messages at ``interval_ns`` (--rate) and time them from when they were due.

    Freed window space is refilled with one write; each write is timed as one batch, recorded
    once per message it holds when its last byte is back.
    """

    __slots__ = (
        "batches",
        "depth",
        "due",
        "in_flight",
        "interval_ns",
        "received",
        "sent",
        "timer",
    )

    def __init__(
        self, counters: Counters, index: int, size: int, depth: int, interval_ns: int, phase_ns: int
    ) -> None:
        super().__init__(counters, index, size)
        self.depth = depth
        self.interval_ns = interval_ns
        self.sent = 0  # bytes sent and received on this connection
        self.received = 0
        self.in_flight = 0  # messages
        self.batches: deque[tuple[int, int, int]] = deque()  # (end of batch, sent at, messages)
        self.due = perf_counter_ns() + phase_ns
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._send(perf_counter_ns())

    def _send(self, now: int) -> None:
        counters = self.counters
        if self.interval_ns == 0:
            count = min(self.depth - self.in_flight, counters.budget)
            if count <= 0:
                return
            counters.budget -= count
            self._write(count, now)
            return
        while self.in_flight < self.depth and counters.budget > 0 and self.due <= now:
            counters.budget -= 1
            self._write(1, self.due)  # timed from when it was due: no coordinated omission
            self.due += self.interval_ns
        if self.timer is None and counters.budget > 0 and self.in_flight < self.depth:
            delay = max(0, self.due - now) / 1e9
            self.timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _write(self, count: int, sent_at: int) -> None:
        length = count * self.size
        payload = pattern.window(self.origin + self.sent, length)
        self.sent += length
        self.in_flight += count
        self.batches.append((self.sent, sent_at, count))
        self.transport.write(payload)

    def _on_timer(self) -> None:
        self.timer = None
        if not self.transport.is_closing():
            self._send(perf_counter_ns())

    def data_received(self, data: bytes) -> None:
        received = self.received
        excess = received + len(data) - self.sent
        if excess > 0:
            self._unexpected(data[len(data) - excess :], self.sent)
            data = data[: len(data) - excess]
        if data != pattern.window(self.origin + received, len(data)):
            self._compare(data, received)
        self.received = received = received + len(data)
        counters = self.counters
        counters.echoed_bytes += len(data)
        batches = self.batches
        if not batches or batches[0][0] > received:
            return
        now = perf_counter_ns()
        record = counters.latency.record
        completed = 0
        while batches and batches[0][0] <= received:
            _, sent_at, count = batches.popleft()
            record(now - sent_at, count)
            completed += count
        self.in_flight -= completed
        counters.round_trips += completed
        if counters.round_trips >= counters.target:
            counters.finished.set()
        self._send(now)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().connection_lost(exc)

    def waiting_since(self) -> int | None:
        return self.batches[0][1] if self.batches else None

    def unanswered(self) -> int:
        return self.in_flight


class SingleEchoClient(Client):
    """Send ``size`` bytes once and wait for them back; then hang up (oneshot) or idle (hold).

    Latency runs from ``started_at``: when the connection attempt began (or was due).
    """

    __slots__ = ("echoed", "hang_up", "partial", "payload", "started_at")

    def __init__(
        self, counters: Counters, index: int, size: int, started_at: int, *, hang_up: bool
    ) -> None:
        super().__init__(counters, index, size)
        self.started_at = started_at
        self.hang_up = hang_up
        self.partial = 0
        self.payload = pattern.window(self.origin, size)
        self.echoed = False

    def start(self) -> None:
        self.transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        partial = self.partial
        if self.echoed or partial + len(data) > self.size:
            self._unexpected(data[max(0, self.size - partial) :], max(self.size, partial))
            data = data[: max(0, self.size - partial)]
        if data != self.payload[partial : partial + len(data)]:
            self._compare(data, partial)
        self.partial = partial = partial + len(data)
        self.counters.echoed_bytes += len(data)
        if partial < self.size or self.echoed:
            return
        self.echoed = True
        counters = self.counters
        counters.latency.record(perf_counter_ns() - self.started_at)
        counters.round_trips += 1
        if counters.round_trips >= counters.target:
            counters.finished.set()
        if self.hang_up:
            self.close()

    def waiting_since(self) -> int | None:
        return None if self.echoed else self.started_at

    def unanswered(self) -> int:
        return 0 if self.echoed else 1
