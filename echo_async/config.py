"""ServerConfig and ServiceConfig: every option, validated once; ConfigError names the bad option.

Config is data: each front end (CLI flags, environment, TOML file, Python) produces one frozen
`ServerConfig` (what `EchoServer` does) inside a `ServiceConfig` (what the process does: loop,
logs, metrics, workers). `echo_async.sources` merges flags, environment and files into them.
"""

from __future__ import annotations

import math
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from echo_async.listeners import TLS_SCHEMES, Listener, ListenerError, parse_listener
from echo_async.proxy_protocol import parse_networks

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12000
# The kernel caps any listen() backlog at net.core.somaxconn (Linux); Go's listeners read it too.
SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"
# listen() takes a C int.
MAX_BACKLOG = (1 << 31) - 1
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_WRITE_BUFFER_HIGH = 256 * 1024
DEFAULT_WS_MAX_MESSAGE = 1 << 20
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_IDLE_TIMEOUT = 300.0

LOOP_CHOICES = ("auto", "uvloop", "asyncio")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_WORKERS = 64
# Set by the supervisor for its workers: the worker's index, 0..N-1 ({worker} in --greeting).
WORKER_ENVIRONMENT_VARIABLE = "ECHO_ASYNC_WORKER"
PROXY_PROTOCOL_CHOICES = ("off", "required", "optional")


class ConfigError(ValueError):
    """An invalid option value; `str()` is one line naming the option as its source spells it.

    `option` is that spelling: the field (`listen`) when a constructor raised the error, the
    flag, variable or file key (`--listen`, `ECHO_ASYNC_LISTEN`, `echo.toml: listen`) once a
    front end renamed it. `field` is the ServerConfig or ServiceConfig field at fault, the key a
    front end renames by; None when the error is about no one field (a config file, a socket).
    """

    def __init__(self, option: str, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message
        self.field = field

    def renamed(self, option: str) -> ConfigError:
        """The same error naming its option as `option` (a front end's spelling of the field)."""
        return ConfigError(option, self.message, field=self.field)


def _invalid(name: str, message: str) -> ConfigError:
    """A ConfigError about field `name`, named as the Python API spells it."""
    return ConfigError(name, message, field=name)


def _option(help_text: str, **extra: Any) -> dict[str, Any]:
    return {"help": help_text, **extra}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What an `EchoServer` listens on and how it treats connections.

    Every field is validated on construction: an invalid value raises `ConfigError`. Limits and
    timeouts are off when 0.
    """

    # Any sequence of URLs is accepted (a list from Python, say); it is stored as a tuple.
    listen: Sequence[str] = field(
        default=(),
        metadata=_option(
            "listener URL, repeatable: tcp://HOST:PORT, tls://HOST:PORT, udp://HOST:PORT, "
            "unix:///PATH, ws://HOST:PORT[/PATH], wss://HOST:PORT[/PATH]; when given, only these "
            "open (--host/--port are ignored)"
        ),
    )
    host: str = field(
        default=DEFAULT_HOST,
        metadata=_option("address to listen on; 0.0.0.0 or :: opens the service to the network"),
    )
    port: int = field(
        default=DEFAULT_PORT,
        metadata=_option("TCP port to listen on; 0 picks a free port"),
    )
    # Resolved when the config is built (os_max_backlog, below), so --print-config writes the
    # number that will be used.
    backlog: int = field(
        default_factory=lambda: os_max_backlog(),
        metadata=_option(
            "listen() backlog: connections the kernel queues before accept; the default is the "
            "most the OS allows (net.core.somaxconn on Linux, socket.SOMAXCONN elsewhere), "
            "which also caps any larger value"
        ),
    )
    reuse_port: bool = field(
        default=False,
        metadata=_option("set SO_REUSEPORT so several processes can listen on the same port"),
    )
    shutdown_timeout: float = field(
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        metadata=_option("seconds open connections get to finish at shutdown before an abort"),
    )
    write_buffer_high: int = field(
        default=DEFAULT_WRITE_BUFFER_HIGH,
        metadata=_option("bytes queued for a client that does not read before we stop reading it"),
    )
    max_connections: int = field(
        default=DEFAULT_MAX_CONNECTIONS,
        metadata=_option("open connections at most; more are accepted and closed at once (0: off)"),
    )
    max_connections_per_ip: int = field(
        default=0,
        metadata=_option("open connections from one client address at most (0: off)"),
    )
    idle_timeout: float = field(
        default=DEFAULT_IDLE_TIMEOUT,
        metadata=_option("close a connection that sent nothing for this many seconds (0: off)"),
    )
    max_lifetime: float = field(
        default=0.0,
        metadata=_option("close a connection this many seconds after it opened (0: off)"),
    )
    max_bytes: int = field(
        default=0,
        metadata=_option("echo at most this many bytes per connection, then close it (0: off)"),
    )
    tls_cert: str = field(
        default="", metadata=_option("PEM certificate chain for tls:// listeners")
    )
    tls_key: str = field(default="", metadata=_option("PEM private key for tls:// listeners"))
    tls_client_ca: str = field(
        default="",
        metadata=_option("PEM CA bundle: require client certificates signed by it (mutual TLS)"),
    )
    tls_handshake_timeout: float = field(
        default=10.0, metadata=_option("seconds a TLS client gets to complete its handshake")
    )
    tls_alpn: str = field(
        default="",
        metadata=_option(
            "ALPN protocols tls:// listeners offer, comma-separated, e.g. echo,h2 (empty: none)"
        ),
    )
    unix_mode: str = field(
        default="0660", metadata=_option("octal permissions of unix:// socket files")
    )
    udp_rate: float = field(
        default=100.0,
        metadata=_option("datagrams per second answered per source address (0: no limit)"),
    )
    udp_burst: int = field(
        default=200, metadata=_option("datagrams a source may send at once above --udp-rate")
    )
    ws_max_message: int = field(
        default=DEFAULT_WS_MAX_MESSAGE,
        metadata=_option(
            "bytes one WebSocket message may have; a bigger one closes the connection with "
            "code 1009 (0: no limit)"
        ),
    )
    ws_handshake_timeout: float = field(
        default=10.0,
        metadata=_option("seconds a ws:// or wss:// client gets to send its opening handshake"),
    )

    proxy_protocol: str = field(
        default="off",
        metadata=_option(
            "expect a PROXY protocol v1/v2 header from trusted sources: required, optional or off",
            choices=PROXY_PROTOCOL_CHOICES,
        ),
    )
    proxy_trusted: str = field(
        default="127.0.0.0/8,::1/128",
        metadata=_option("CIDRs whose PROXY headers are honoured, comma-separated"),
    )
    proxy_header_timeout: float = field(
        default=5.0, metadata=_option("seconds a connection gets to send its PROXY header")
    )
    greeting: str = field(
        default="",
        metadata=_option(
            "send TEXT and a newline when a TCP connection opens, before any echo (on ws:// a "
            "first text message); "
            "{hostname} {pid} {port} {worker} are expanded (empty: off, pure RFC 862 echo)"
        ),
    )
    fault_delay: float = field(
        default=0.0, metadata=_option("fault: hold each echoed chunk this many milliseconds")
    )
    fault_jitter: float = field(
        default=0.0, metadata=_option("fault: add 0..this many random milliseconds to each delay")
    )
    fault_chunk: int = field(
        default=0, metadata=_option("fault: write replies in pieces of at most N bytes")
    )
    fault_rate: int = field(
        default=0, metadata=_option("fault: cap each connection's echo at this many bytes/s")
    )
    fault_reset_after: int = field(
        default=0,
        metadata=_option("fault: abort a connection with a TCP RST after echoing exactly N bytes"),
    )
    fault_drop: float = field(
        default=0.0, metadata=_option("fault: drop each UDP datagram with this probability")
    )
    fault_seed: int = field(
        default=-1, metadata=_option("fault: seed for the random choices (-1: unseeded)")
    )

    @property
    def faults_enabled(self) -> bool:
        """True when any stream fault is configured (the byte path then leaves its fast lane)."""
        return bool(
            self.fault_delay
            or self.fault_jitter
            or self.fault_chunk
            or self.fault_rate
            or self.fault_reset_after
        )

    def __post_init__(self) -> None:
        _check_str(self, "host", allow_empty=False)
        _check_int(self, "port", 0, 65535)
        _check_int(self, "backlog", 1, MAX_BACKLOG)
        _check_bool(self, "reuse_port")
        _check_seconds(self, "shutdown_timeout")
        _check_int(self, "write_buffer_high", 1024, 1 << 30)
        _check_int(self, "max_connections", 0, 1 << 24)
        _check_int(self, "max_connections_per_ip", 0, 1 << 24)
        _check_seconds(self, "idle_timeout")
        _check_seconds(self, "max_lifetime")
        _check_int(self, "max_bytes", 0, 1 << 62)
        for name in ("tls_cert", "tls_key", "tls_client_ca", "unix_mode"):
            _check_str(self, name, allow_empty=name != "unix_mode")
        _check_seconds(self, "tls_handshake_timeout")
        _check_str(self, "tls_alpn", allow_empty=True)
        for protocol in self.alpn_protocols:
            if not protocol.isascii() or not 1 <= len(protocol) <= 255:
                raise _invalid("tls_alpn", f"{protocol!r} is not a protocol name")
        if not self.tls_handshake_timeout:
            raise _invalid("tls_handshake_timeout", "must be more than 0")
        try:
            mode = int(self.unix_mode, 8)
        except ValueError:
            raise _invalid("unix_mode", f"{self.unix_mode!r} is not an octal mode") from None
        if not 0 <= mode <= 0o777:
            raise _invalid("unix_mode", f"{self.unix_mode} is not a mode in 0..0777")
        _check_seconds(self, "udp_rate")
        _check_int(self, "udp_burst", 1, 1 << 20)
        _check_int(self, "ws_max_message", 0, 1 << 31)
        _check_seconds(self, "ws_handshake_timeout")
        if not self.ws_handshake_timeout:
            raise _invalid("ws_handshake_timeout", "must be more than 0")
        _check_choice(self, "proxy_protocol")
        _check_str(self, "proxy_trusted", allow_empty=True)
        try:
            parse_networks(self.proxy_trusted)
        except ValueError as error:
            raise _invalid("proxy_trusted", str(error)) from None
        _check_seconds(self, "proxy_header_timeout")
        if not self.proxy_header_timeout:
            raise _invalid("proxy_header_timeout", "must be more than 0")
        _check_str(self, "greeting", allow_empty=True)
        if "\n" in self.greeting or "\r" in self.greeting:
            raise _invalid("greeting", "must be one line")
        try:
            self.greeting.format(hostname="", pid=0, port=0, worker=0)
        except (KeyError, IndexError, ValueError) as error:
            raise _invalid(
                "greeting",
                f"unknown placeholder {error}; use {{hostname}} {{pid}} {{port}} {{worker}}",
            ) from None
        for name in ("fault_delay", "fault_jitter"):
            _check_seconds(self, name)
        _check_int(self, "fault_chunk", 0, 1 << 30)
        _check_int(self, "fault_rate", 0, 1 << 40)
        _check_int(self, "fault_reset_after", 0, 1 << 62)
        if not isinstance(self.fault_drop, int | float) or not 0 <= self.fault_drop <= 1:
            raise _invalid("fault_drop", f"{self.fault_drop!r} is not a probability in 0..1")
        _check_int(self, "fault_seed", -1, (1 << 63) - 1)
        _check_listen(self)

    @property
    def alpn_protocols(self) -> list[str]:
        """`tls_alpn` as a list, in the order given."""
        return [part.strip() for part in self.tls_alpn.split(",") if part.strip()]

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """Every listener: the `listen` URLs, or one TCP listener on host and port."""
        if self.listen:
            return tuple(parse_listener(url) for url in self.listen)
        return (Listener("tcp", self.host, self.port),)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The whole `echo-async serve` process: its server plus loop, logs, metrics and workers."""

    server: ServerConfig = field(default_factory=ServerConfig)
    loop: str = field(
        default="auto",
        metadata=_option(
            "event loop; auto uses uvloop when it can be imported", choices=LOOP_CHOICES
        ),
    )
    log_format: str = field(
        default="auto",
        metadata=_option(
            "auto is console on a terminal, JSON lines otherwise", choices=LOG_FORMATS
        ),
    )
    log_level: str = field(default="info", metadata=_option("log level", choices=LOG_LEVELS))
    metrics: str = field(
        default="",
        metadata=_option("serve Prometheus /metrics and /healthz on HOST:PORT (empty: off)"),
    )
    workers: int = field(
        default=1,
        metadata=_option("worker processes sharing the port under a supervisor"),
    )
    drain_delay: float = field(
        default=0.0,
        metadata=_option(
            "seconds to keep accepting after SIGTERM while /healthz answers 503, so a load "
            "balancer stops sending new connections before the listeners close"
        ),
    )

    def __post_init__(self) -> None:
        for name in ("loop", "log_format", "log_level"):
            _check_choice(self, name)
        _check_seconds(self, "drain_delay")
        _check_str(self, "metrics", allow_empty=True)
        if self.metrics:
            parse_host_port(self.metrics, "metrics", field="metrics")
        _check_int(self, "workers", 1, MAX_WORKERS)


@dataclass(frozen=True, slots=True)
class Option:
    """One option as every front end sees it: `--flag`, `ECHO_ASYNC_NAME`, TOML key `name`."""

    name: str
    kind: type[Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None
    scope: str  # "server" (a ServerConfig field) or "service" (a ServiceConfig field)

    @property
    def flag(self) -> str:
        return option_flag(self.name)

    @property
    def environment_variable(self) -> str:
        return ENVIRONMENT_PREFIX + self.name.upper()


ENVIRONMENT_PREFIX = "ECHO_ASYNC_"
_KINDS: dict[str, type[Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "Sequence[str]": tuple,
}


def _collect_options() -> tuple[Option, ...]:
    collected = []
    server_defaults = ServerConfig()
    for item in fields(ServerConfig):
        collected.append(
            Option(
                item.name,
                _KINDS[str(item.type)],
                getattr(server_defaults, item.name),
                item.metadata["help"],
                item.metadata.get("choices"),
                "server",
            )
        )
    service_defaults = ServiceConfig()
    for item in fields(ServiceConfig):
        if item.name == "server":
            continue
        collected.append(
            Option(
                item.name,
                _KINDS[str(item.type)],
                getattr(service_defaults, item.name),
                item.metadata["help"],
                item.metadata.get("choices"),
                "service",
            )
        )
    return tuple(collected)


def build_service_config(values: dict[str, Any]) -> ServiceConfig:
    """A ServiceConfig from option values by name (missing ones take their defaults)."""
    server_values = {k: v for k, v in values.items() if OPTIONS_BY_NAME[k].scope == "server"}
    service_values = {k: v for k, v in values.items() if OPTIONS_BY_NAME[k].scope == "service"}
    return ServiceConfig(server=ServerConfig(**server_values), **service_values)


def os_max_backlog() -> int:
    """The largest listen() backlog the OS grants: the default of `ServerConfig.backlog`.

    On Linux that is net.core.somaxconn, read on every call (an operator may raise it); where it
    can't be read, or elsewhere, `socket.SOMAXCONN`. Clients arriving together beyond the
    backlog have their SYNs dropped, and retry only after 1 s, then 3 s.
    """
    if sys.platform == "linux":
        try:
            with open(SOMAXCONN_PATH, "rb") as file:
                value = int(file.read().strip())
        except (OSError, ValueError):
            pass
        else:
            # 0 is how Go reads an unset value too: fall back rather than listen(0).
            if value > 0:
                return min(value, MAX_BACKLOG)
    return socket.SOMAXCONN


def option_flag(name: str) -> str:
    """The command-line flag of option `name` (`shutdown_timeout` -> `--shutdown-timeout`)."""
    return "--" + name.replace("_", "-")


def parse_host_port(text: str, option: str, *, field: str | None = None) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port); ConfigError naming `option` otherwise."""
    host, separator, port_text = text.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise ConfigError(option, f"expected HOST:PORT, got {text!r}", field=field)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(option, f"port {port} is out of range 0..65535", field=field)
    return host, port


def _check_str(config: Any, name: str, *, allow_empty: bool) -> None:
    value = getattr(config, name)
    if not isinstance(value, str):
        raise _invalid(name, f"expected a string, got {value!r}")
    _check_text(name, value)
    if not allow_empty and not value:
        raise _invalid(name, "must not be empty")


def _check_text(name: str, value: str) -> None:
    # A byte that is not UTF-8 in argv or the environment reaches Python as a lone surrogate
    # (surrogateescape). Such text can't be sent, logged as JSON or written to a TOML file.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(name, f"not valid UTF-8 text: {value!r}") from None


def _check_listen(config: ServerConfig) -> None:
    urls = config.listen
    if isinstance(urls, str | bytes | bytearray) or not isinstance(urls, Sequence):
        raise _invalid("listen", f"expected a list of URLs, got {urls!r}")
    # Frozen: the stored value is the tuple, whatever sequence the caller passed.
    object.__setattr__(config, "listen", tuple(urls))
    for url in urls:
        if not isinstance(url, str):
            raise _invalid("listen", f"expected a URL, got {url!r}")
        _check_text("listen", url)
        try:
            listener = parse_listener(url)
        except ListenerError as error:
            raise _invalid("listen", str(error)) from None
        if listener.scheme in TLS_SCHEMES and not (config.tls_cert and config.tls_key):
            raise _invalid("listen", f"{url} needs --tls-cert and --tls-key")


def _check_choice(config: Any, name: str) -> None:
    value = getattr(config, name)
    allowed: tuple[str, ...] = next(
        item.metadata["choices"] for item in fields(config) if item.name == name
    )
    if value not in allowed:
        raise _invalid(name, f"{value!r} is not one of {', '.join(allowed)}")


def _check_bool(config: Any, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, bool):
        raise _invalid(name, f"expected true or false, got {value!r}")


def _check_int(config: Any, name: str, low: int, high: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, f"expected an integer, got {value!r}")
    if not low <= value <= high:
        raise _invalid(name, f"{value} is out of range {low}..{high}")


def _check_seconds(config: Any, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(name, f"expected seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise _invalid(name, f"{value} is not a non-negative number of seconds")


OPTIONS: tuple[Option, ...] = _collect_options()
OPTIONS_BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
