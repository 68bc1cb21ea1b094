"""Fault injection: a connection that echoes late, in small pieces, slowly, or resets on purpose.

For testing clients and proxies against bad peers (`--fault-*`). Off by default; when off the
server never creates a FaultyConnection, so the byte path is the plain EchoConnection's.
Order is always kept: each piece is written no earlier than the one before it. Pieces waiting to
be written count against the write-buffer high-water mark, so backpressure still holds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import random
import socket
import struct
import termios
from typing import Any

from echo_async.config import ServerConfig
from echo_async.connection import EchoConnection, State

REASON_FAULT_RESET = "fault_reset"
_RESET_POLL_S = 0.005
_RESET_WAIT_S = 5.0


class FaultPlan:
    """The faults of one server, read once from its config."""

    def __init__(self, config: ServerConfig) -> None:
        self.delay_s = config.fault_delay / 1000
        self.jitter_s = config.fault_jitter / 1000
        self.chunk = config.fault_chunk
        self.rate = config.fault_rate
        self.reset_after = config.fault_reset_after
        self.seed = config.fault_seed
        self.high_water = config.write_buffer_high

    def random_for(self, serial: int) -> random.Random:
        """Per-connection randomness: reproducible from the seed and the connection's number."""
        return random.Random(f"{self.seed}:{serial}") if self.seed >= 0 else random.Random()


class FaultyConnection(EchoConnection):
    """An EchoConnection whose echo goes through the configured faults.

    Held pieces wait in one FIFO queue served by one timer, so they leave in the order they
    came in even when jitter gives two of them the same due time.
    """

    __slots__ = (
        "echoed",
        "eof_pending",
        "faults",
        "fin_pending",
        "pending_bytes",
        "plan",
        "queue",
        "random",
        "rate_clock",
        "ready_at",
        "reset_started",
        "timer",
    )

    def __init__(self, *args: Any, plan: FaultPlan, serial: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.random = plan.random_for(serial)
        self.faults: collections.Counter[str] = collections.Counter()
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.Handle | None = None
        self.ready_at = 0.0
        self.rate_clock = 0.0
        self.pending_bytes = 0
        self.echoed = 0
        self.reset_started = False
        self.eof_pending = False
        self.fin_pending = False

    def data_received(self, data: bytes) -> None:
        # EchoConnection.data_received with echo() in place of transport.write(), and never
        # switched to reading in place (held pieces must outlive the read): the plain class
        # keeps its direct write, so faults cost nothing when they are off.
        total = self.bytes_in + len(data)
        self.bytes_in = total
        if total > self.byte_limit:
            self._over_limit(data)
            return
        self.echo(data)

    def echo(self, data: bytes) -> None:
        if self.state is not State.OPEN:
            # Finishing (shutdown, a limit) overrides the fault timing: what finish() owes the
            # client goes out now, behind what was held (finish() wrote that already).
            self.transport.write(data)
            return
        plan = self.plan
        if plan.reset_after:
            room = plan.reset_after - self.echoed
            if room <= 0:
                self.discarded += len(data)
                return
            if len(data) > room:
                self.discarded += len(data) - room
                data = data[:room]
        self.echoed += len(data)
        pieces = [data]
        if plan.chunk and len(data) > plan.chunk:
            pieces = [data[i : i + plan.chunk] for i in range(0, len(data), plan.chunk)]
            self.faults["chunk"] += len(pieces)
        now = asyncio.get_running_loop().time()
        for piece in pieces:
            at = max(now, self.ready_at)
            if plan.delay_s or plan.jitter_s:
                at = max(at, now + plan.delay_s + plan.jitter_s * self.random.random())
                self.faults["delay"] += 1
            if plan.rate:
                start = max(self.rate_clock, now)
                if start > now:
                    self.faults["rate"] += 1
                at = max(at, start)
                self.rate_clock = start + len(piece) / plan.rate
            self.ready_at = at
            self.pending_bytes += len(piece)
            self.queue.append((at, piece))
        if self.pending_bytes > plan.high_water and not self.transport.is_closing():
            self.transport.pause_reading()
        self._arm()
        if plan.reset_after and self.echoed >= plan.reset_after:
            self.reset_started = True

    def _arm(self) -> None:
        if self.timer is None and self.queue:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_at(self.queue[0][0], self._release)

    def _release(self) -> None:
        """Write every held piece that is due, in order; then wait for the next one."""
        self.timer = None
        now = asyncio.get_running_loop().time()
        while self.queue and self.queue[0][0] <= now:
            _, piece = self.queue.popleft()
            self._write(piece)
            if self.plan.chunk:
                break  # one send per piece: the next one goes out on the next loop turn
        if self.queue:
            if self.plan.chunk and self.queue[0][0] <= now:
                self.timer = asyncio.get_running_loop().call_soon(self._release)
            else:
                self._arm()
        elif self.fin_pending or self.eof_pending:
            if self.fin_pending and not self.transport.is_closing():
                super().write_eof()  # our FIN waited for the pieces held before it
            self.fin_pending = False
            if self.eof_pending:
                self.transport.close()  # the client sent EOF: done once everything held is out
        elif self.reset_started:
            self._reset_when_sent(now)

    def _write(self, piece: bytes) -> None:
        self.pending_bytes -= len(piece)
        if self.transport.is_closing():
            self.discarded += len(piece)
            return
        self.transport.write(piece)
        if (
            self.pending_bytes <= self.plan.high_water // 2
            and not self.writing_paused
            and not self.lost
        ):
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    def write_eof(self) -> None:
        if self.queue:
            self.fin_pending = True  # after the held pieces, in order (see _release)
            return
        super().write_eof()

    def eof_received(self) -> bool:
        if self.pending_bytes:
            # Keep the transport open until the held pieces are written, then close.
            super().eof_received()
            self.eof_pending = True
            return True
        return super().eof_received()

    def finish(self, reason: str, deadline: float) -> None:
        # Finishing (shutdown, a limit) overrides the fault timing: write what is held now.
        self._cancel_timer()
        while self.queue:
            self._write(self.queue.popleft()[1])
        super().finish(reason, deadline)

    def resume_writing(self) -> None:
        if self.pending_bytes <= self.plan.high_water // 2:
            super().resume_writing()
        else:
            self.writing_paused = False  # the transport drained; our own queue still holds

    @property
    def bytes_out(self) -> int:
        """Held pieces are not sent yet."""
        return super().bytes_out - self.pending_bytes

    def _reset_when_sent(self, started: float) -> None:
        # "After exactly N bytes have been echoed": wait until the peer has them all (nothing
        # queued here or unacknowledged in the kernel), then RST.
        loop = asyncio.get_running_loop()
        if self.transport.is_closing():
            return
        sent = not self.transport.get_write_buffer_size() and _kernel_unsent(self.transport) == 0
        if sent or loop.time() - started > _RESET_WAIT_S:
            self.faults["reset"] += 1
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0: close sends RST even when nothing is left unread.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.abort(REASON_FAULT_RESET)
            return
        self.timer = loop.call_later(_RESET_POLL_S, self._reset_when_sent, started)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.discarded += self.pending_bytes
        self.pending_bytes = 0
        self.queue.clear()
        super().connection_lost(exc)

    def record(self, ended_at: float | None = None) -> dict[str, Any]:
        record = super().record(ended_at)
        record["faults_injected"] = dict(self.faults)
        return record


def _kernel_unsent(transport: Any) -> int:
    """Bytes the kernel still holds unacknowledged for this socket (Linux TIOCOUTQ), or 0."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])
