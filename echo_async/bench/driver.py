"""Driver: runs one process's share of a load test and reports what happened every tick.

Each connection is a *slot* task that opens connections as its mode requires (keep one open,
reconnect after errors; open, echo, close, repeat; open once and hold). A tick loop reports a
:class:`Sample` every ``TICK_S``, expires overdue echoes, and ends the run. Every task is owned
and awaited before :meth:`Driver.run` returns.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from time import perf_counter, perf_counter_ns
from typing import Any, cast

from echo_async.bench.clients import Client, PingPongClient, PipelineClient, SingleEchoClient
from echo_async.bench.config import BenchConfig
from echo_async.bench.counters import Counters, cannot_resolve, describe
from echo_async.bench.datagram import DatagramClient
from echo_async.bench.greeting import GreetingError, GreetingReader
from echo_async.bench.websocket import (
    WebSocketPipelineClient,
    WebSocketSingleEchoClient,
    parse_url,
)

TICK_S = 0.25
CONNECT_CONCURRENCY = 512  # connects in progress at once: a SYN flood helps no one
RETRY_DELAY_S = 0.1
CLOSE_WAIT_S = 2.0

AnyClient = Client | DatagramClient


def _greeting_reader(build: Callable[[], asyncio.BaseProtocol]) -> GreetingReader:
    # --greeting and --udp exclude each other, so ``build`` makes a stream client.
    return GreetingReader(cast(Client, build()))


@dataclass(slots=True)
class Sample:
    """One tick of one process: counts since the previous sample; ``connections_open`` is a level.

    ``latency`` holds the round trips completed in the tick, as sparse histogram buckets.
    """

    tick: int
    elapsed_s: float
    round_trips: int
    echoed_bytes: int
    connections_made: int
    connections_open: int
    errors: int
    mismatched_bytes: int
    latency: dict[int, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        fields = dict(data)
        fields["latency"] = {int(index): count for index, count in data["latency"].items()}
        return cls(**fields)


@dataclass(slots=True)
class ShareSummary:
    """How one process's run ended; ``backends`` counts connections per greeting line."""

    elapsed_s: float
    error_kinds: dict[str, int]
    first_mismatch: str | None
    backends: dict[str, int] = field(default_factory=dict)


class Driver:
    """Runs ``config`` (one process's share) in the running loop, calling ``emit`` every tick."""

    def __init__(
        self,
        config: BenchConfig,
        emit: Callable[[Sample], None],
        stop: asyncio.Event | None = None,
    ) -> None:
        self.config = config
        self.emit = emit
        self.stop = stop
        self.counters = Counters(config.requests)
        self.clients: set[AnyClient] = set()
        self.ssl_context = config.ssl_context()
        self.started = 0.0
        self.live_slots = 0
        self.last = (0, 0, 0, 0, 0)
        self.gate: asyncio.Semaphore | None = None
        self.last_tick = 0
        # --url: the same traffic shapes, one WebSocket message per echo.
        self.websocket_uri = None if config.url is None else parse_url(config.url)
        self.single_echo: Callable[..., AnyClient] = SingleEchoClient
        if self.websocket_uri is not None:
            self.single_echo = partial(WebSocketSingleEchoClient, uri=self.websocket_uri)

    async def run(self) -> ShareSummary:
        """Run to the end (duration, requests, too many errors, stop) and return the summary."""
        loop = asyncio.get_running_loop()
        self.gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        self.started = perf_counter()
        body = {
            "pingpong": self._keep_connected,
            "stream": self._keep_connected,
            "oneshot": self._connect_repeatedly,
            "hold": self._hold,
        }[self.config.mode]
        self.live_slots = self.config.connections
        tasks = [loop.create_task(self._slot(body, n)) for n in range(self.config.connections)]
        if self.stop is not None:
            tasks.append(loop.create_task(self._watch_stop(self.stop)))
        try:
            elapsed = await self._tick_until_done()
        finally:
            self.counters.stopping = True
            closing = [client.closed for client in self.clients]
            for client in list(self.clients):
                client.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if closing:
                await asyncio.wait(closing, timeout=CLOSE_WAIT_S)
        if (self.counters.errors, self.counters.mismatched_bytes) != self.last[3:]:
            # Found while closing (a WebSocket close code): into the last tick, so they count.
            self._emit(self.last_tick, self.started + elapsed)
        return ShareSummary(
            elapsed_s=elapsed,
            error_kinds=dict(self.counters.error_kinds),
            first_mismatch=self.counters.first_mismatch,
            backends=dict(self.counters.backends),
        )

    async def _watch_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.counters.finished.set()

    async def _tick_until_done(self) -> float:
        counters = self.counters
        config = self.config
        deadline = None if config.duration is None else self.started + config.duration
        timeout_ns = int(config.timeout * 1e9)
        tick = 0
        while True:
            next_tick = self.started + (tick + 1) * TICK_S
            wake = next_tick if deadline is None else min(next_tick, deadline)
            delay = wake - perf_counter()
            if delay > 0 and not counters.finished.is_set():
                try:
                    async with asyncio.timeout(delay):
                        await counters.finished.wait()
                except TimeoutError:
                    pass
            now = perf_counter()
            if (
                counters.finished.is_set()
                or (deadline is not None and now >= deadline)
                or (counters.errors > config.max_errors and config.mode != "hold")
            ):
                self._emit(tick, now)
                return now - self.started
            if now >= next_tick:
                self._emit(tick, now)
                tick = max(tick + 1, int((now - self.started) / TICK_S))
                now_ns = perf_counter_ns()
                for client in list(self.clients):
                    client.tick(now_ns, timeout_ns)

    def _emit(self, tick: int, now: float) -> None:
        counters = self.counters
        current = (
            counters.round_trips,
            counters.echoed_bytes,
            counters.connections_made,
            counters.errors,
            counters.mismatched_bytes,
        )
        delta = [now_value - before for now_value, before in zip(current, self.last, strict=True)]
        self.last = current
        self.last_tick = tick
        self.emit(
            Sample(
                tick=tick,
                elapsed_s=now - self.started,
                round_trips=delta[0],
                echoed_bytes=delta[1],
                connections_made=delta[2],
                connections_open=counters.connections_open,
                errors=delta[3],
                mismatched_bytes=delta[4],
                latency=counters.latency.take_sparse(),
            )
        )

    async def _slot(self, body: Callable[[int], Awaitable[None]], number: int) -> None:
        try:
            await body(number)
        finally:
            self.live_slots -= 1
            if self.live_slots == 0:
                self.counters.finished.set()

    async def _pace(self, number: int) -> None:
        """Hold back connection ``number`` of this share until --connect-rate allows it."""
        if self.config.connect_rate is not None:
            delay = self.started + number / self.config.connect_rate - perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)

    def _give_up(self) -> bool:
        return self.counters.stopping or self.counters.errors > self.config.max_errors

    async def _open(self, build: Callable[[int], AnyClient]) -> AnyClient | None:
        """Connect one client made by ``build(perf_counter_ns() when the connect began)``,
        after reading the greeting with --greeting; on failure count the error and return None.
        """
        config = self.config
        loop = asyncio.get_running_loop()
        assert self.gate is not None
        try:
            async with self.gate, asyncio.timeout(config.timeout):
                factory: Callable[[], asyncio.BaseProtocol] = partial(build, perf_counter_ns())
                if config.greeting:
                    factory = partial(_greeting_reader, factory)
                protocol: asyncio.BaseProtocol
                if config.udp:
                    assert config.port is not None
                    _, protocol = await loop.create_datagram_endpoint(
                        factory, remote_addr=(config.host, config.port)
                    )
                elif config.unix_path is not None:
                    _, protocol = await loop.create_unix_connection(
                        factory,
                        config.unix_path,
                        ssl=self.ssl_context,
                        server_hostname=config.host if self.ssl_context else None,
                    )
                else:
                    assert config.port is not None
                    _, protocol = await loop.create_connection(
                        factory,
                        config.host,
                        config.port,
                        ssl=self.ssl_context,
                        server_hostname=config.host if self.ssl_context else None,
                    )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            if not self.counters.stopping:
                if isinstance(exc, socket.gaierror):
                    kind = cannot_resolve(config.host, exc)
                else:
                    kind = describe(exc, handshake=True)
                self.counters.error(f"connect: {kind}")
            return None
        client: AnyClient | None
        if isinstance(protocol, GreetingReader):
            client = await self._greeted(protocol)
            if client is None:
                return None
        else:
            client = cast(AnyClient, protocol)
        self.clients.add(client)
        client.closed.add_done_callback(lambda _: self.clients.discard(client))
        return client

    async def _greeted(self, reader: GreetingReader) -> Client | None:
        """The client ``reader`` hands its connection to, once the greeting is read within
        --timeout; else count the error, abort the connection and return None.
        """
        try:
            async with asyncio.timeout(self.config.timeout):
                await reader.greeted
        except GreetingError as exc:
            problem = str(exc)
        except TimeoutError:
            if reader.handed_over:  # the line came just as the timeout expired
                return reader.client
            problem = f"no line within {self.config.timeout:g}s"
        except asyncio.CancelledError:
            reader.transport.abort()
            raise
        else:
            return reader.client
        reader.transport.abort()
        if not self.counters.stopping:
            self.counters.error(f"greeting: {problem}")
        return None

    def _interval_ns(self) -> int:
        rate = self.config.rate
        return 0 if rate is None else int(self.config.connections / rate * 1e9)

    def _stream_client(self, number: int) -> AnyClient:
        config = self.config
        index = config.connection_offset + number
        if config.udp:
            return DatagramClient(self.counters, index, config.size)
        interval = self._interval_ns()
        if self.websocket_uri is not None:
            phase = interval * number // config.connections
            return WebSocketPipelineClient(
                self.counters, index, config.size, config.depth, interval, phase, self.websocket_uri
            )
        if config.depth == 1 and interval == 0:
            return PingPongClient(self.counters, index, config.size)
        phase = interval * number // config.connections
        return PipelineClient(self.counters, index, config.size, config.depth, interval, phase)

    async def _keep_connected(self, number: int) -> None:
        """pingpong and stream: keep one connection open, reconnecting while errors allow."""
        await self._pace(number)
        while True:
            client = await self._open(lambda _: self._stream_client(number))
            if client is not None:
                await asyncio.wait((client.closed,))
            if self._give_up():
                return
            await asyncio.sleep(RETRY_DELAY_S)

    async def _connect_repeatedly(self, number: int) -> None:
        """oneshot: connect, echo once, close, repeat; timed from the connect (or when due)."""
        config = self.config
        counters = self.counters
        index = config.connection_offset + number
        interval = self._interval_ns()
        await self._pace(number)
        due = perf_counter_ns() + interval * number // config.connections
        while counters.budget > 0 and not counters.stopping:
            counters.budget -= 1
            if interval:
                delay = due - perf_counter_ns()
                if delay > 0:
                    await asyncio.sleep(delay / 1e9)
                # Timed from when it was due, not when it began: no coordinated omission.
                client = await self._open(partial(self._due_client, index, due))
                due += interval
            else:
                client = await self._open(
                    partial(self.single_echo, counters, index, config.size, hang_up=True)
                )
            if client is None:
                counters.budget += 1
                if self._give_up():
                    return
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            await asyncio.wait((client.closed,))
            if self._give_up():
                return

    def _due_client(self, index: int, due: int, _: int) -> AnyClient:
        return self.single_echo(self.counters, index, self.config.size, due, hang_up=True)

    async def _hold(self, number: int) -> None:
        """hold: open one connection, echo once, then keep it open until the run ends."""
        config = self.config
        index = config.connection_offset + number
        await self._pace(number)
        client = await self._open(
            partial(self.single_echo, self.counters, index, config.size, hang_up=False)
        )
        if client is not None:
            await asyncio.wait((client.closed,))
