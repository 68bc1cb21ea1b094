"""BenchConfig: every option of one load test, validated once."""

from __future__ import annotations

import dataclasses
import math
import ssl
from dataclasses import dataclass
from typing import Any, Literal, get_args

from echo_async.bench import websocket

Mode = Literal["pingpong", "stream", "oneshot", "hold"]
MODES: tuple[Mode, ...] = get_args(Mode)

STREAM_WINDOW = 256 * 1024
"""Bytes in flight per connection in stream mode unless --pipeline says otherwise."""


class BenchConfigError(ValueError):
    """An invalid combination of bench options; the message names the option."""


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """One load test: where to connect, what to send, for how long.

    ``connections``, ``requests``, ``rate`` and ``connect_rate`` are totals over all processes;
    :meth:`share` cuts them into one process's part. ``connection_offset`` is the index of this
    share's first connection (it picks the pattern position of each connection). ``greeting``:
    every connection first reads the server's one-line greeting and counts it per backend.
    """

    mode: Mode
    connections: int
    size: int
    duration: float | None = None
    requests: int | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    unix_path: str | None = None
    url: str | None = None
    """``--url ws://`` or ``wss://``: a WebSocket server; sets host, port and tls from itself."""
    tls: bool = False
    tls_ca: str | None = None
    udp: bool = False
    greeting: bool = False
    rate: float | None = None
    connect_rate: float | None = None
    pipeline: int | None = None
    processes: int = 1
    max_errors: int = 0
    timeout: float = 10.0
    connection_offset: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BenchConfigError(f"--mode must be one of {', '.join(MODES)}")
        if self.connections < 1:
            raise BenchConfigError("--connections must be at least 1")
        if self.size < 1:
            raise BenchConfigError("--size must be at least 1 byte")
        if (self.duration is None) == (self.requests is None):
            raise BenchConfigError("give exactly one of --duration and --requests")
        if self.duration is not None and not (0 < self.duration < math.inf):
            raise BenchConfigError("--duration must be a positive number of seconds")
        if self.requests is not None and self.requests < 1:
            raise BenchConfigError("--requests must be at least 1")
        if self.mode == "hold" and self.duration is None:
            raise BenchConfigError("--mode hold needs --duration (how long to hold)")
        if self.url is not None:
            websocket.adopt_url(self)
        elif (self.port is None) == (self.unix_path is None):
            raise BenchConfigError("give exactly one of --port and --unix")
        if self.port is not None and not 0 < self.port < 65536:
            raise BenchConfigError("--port must be between 1 and 65535")
        if self.udp and self.unix_path is not None:
            raise BenchConfigError("--udp and --unix cannot be combined")
        if self.udp and self.tls:
            raise BenchConfigError("--udp and --tls cannot be combined")
        if self.udp and self.greeting:
            raise BenchConfigError("--udp and --greeting cannot be combined")
        if self.tls_ca is not None and not self.tls:
            raise BenchConfigError("--tls-ca needs --tls")
        if self.udp and self.mode != "pingpong":
            raise BenchConfigError("--udp supports --mode pingpong only")
        if self.udp and (self.rate is not None or (self.pipeline or 1) > 1):
            raise BenchConfigError("--udp does not support --rate or --pipeline")
        if self.udp and self.size > 65507:
            raise BenchConfigError("--size must be at most 65507 bytes with --udp")
        if self.rate is not None and not (0 < self.rate < math.inf):
            raise BenchConfigError("--rate must be a positive number of round trips per second")
        if self.rate is not None and self.mode in ("stream", "hold"):
            raise BenchConfigError(f"--rate does not apply to --mode {self.mode}")
        if self.connect_rate is not None and not (0 < self.connect_rate < math.inf):
            raise BenchConfigError("--connect-rate must be a positive number per second")
        if self.pipeline is not None and self.pipeline < 1:
            raise BenchConfigError("--pipeline must be at least 1")
        if self.pipeline is not None and self.mode in ("oneshot", "hold"):
            raise BenchConfigError(f"--pipeline does not apply to --mode {self.mode}")
        if self.processes < 1:
            raise BenchConfigError("--processes must be at least 1")
        if self.processes > self.connections:
            raise BenchConfigError("--processes cannot exceed --connections")
        if self.requests is not None and self.processes > self.requests:
            raise BenchConfigError("--processes cannot exceed --requests")
        if self.max_errors < 0:
            raise BenchConfigError("--max-errors must be 0 or more")
        if not (0 < self.timeout < math.inf):
            raise BenchConfigError("--timeout must be a positive number of seconds")

    @property
    def depth(self) -> int:
        """Messages of ``size`` bytes in flight per connection."""
        if self.pipeline is not None:
            return self.pipeline
        if self.mode == "stream":
            return max(1, STREAM_WINDOW // self.size)
        return 1

    @property
    def target(self) -> str:
        """The server as a URL: tcp://, tls://, udp://, unix://, or --url (ws://, wss://)."""
        if self.url is not None:
            return self.url
        if self.unix_path is not None:
            return f"{'unix+tls' if self.tls else 'unix'}://{self.unix_path}"
        scheme = "udp" if self.udp else "tls" if self.tls else "tcp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context: verifying against ``tls_ca`` if given, else accepting any
        certificate (a load tester usually targets test servers with self-signed ones).
        """
        if not self.tls:
            return None
        if self.tls_ca is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            return ssl.create_default_context(cafile=self.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise BenchConfigError(f"--tls-ca {self.tls_ca}: {exc}") from exc

    def share(self, index: int, count: int) -> BenchConfig:
        """Part ``index`` of ``count`` equal parts, for one worker process."""
        first = _split(self.connections, count, index, before=True)
        connections = _split(self.connections, count, index)
        fraction = connections / self.connections
        return dataclasses.replace(
            self,
            connections=connections,
            requests=None if self.requests is None else _split(self.requests, count, index),
            rate=None if self.rate is None else self.rate * fraction,
            connect_rate=None if self.connect_rate is None else self.connect_rate * fraction,
            processes=1,
            connection_offset=self.connection_offset + first,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form; ``BenchConfig(**config.to_dict())`` gives it back."""
        return dataclasses.asdict(self)


def _split(total: int, parts: int, index: int, *, before: bool = False) -> int:
    """Size of part ``index`` when ``total`` is cut into ``parts`` near-equal parts.

    With ``before``, the sum of the sizes of the parts before ``index``.
    """
    base, extra = divmod(total, parts)
    if before:
        return base * index + min(index, extra)
    return base + (1 if index < extra else 0)
