"""ServerConfig: every option of the echo server, validated once; ConfigError names the bad option.

Config is data: each front end (CLI flags, and later environment and TOML) produces one frozen
`ServerConfig`; `EchoServer` only reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12000
DEFAULT_BACKLOG = 1024
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_WRITE_BUFFER_HIGH = 256 * 1024


class ConfigError(ValueError):
    """An invalid option value; `str()` is one line naming the option."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


def _option(help_text: str, **extra: Any) -> dict[str, Any]:
    return {"help": help_text, **extra}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What an `EchoServer` listens on and how it treats connections.

    Every field is validated on construction: an invalid value raises `ConfigError`.
    """

    host: str = field(
        default=DEFAULT_HOST,
        metadata=_option(
            "address to listen on; 0.0.0.0 or :: opens the service to the network",
        ),
    )
    port: int = field(
        default=DEFAULT_PORT,
        metadata=_option("TCP port to listen on; 0 picks a free port"),
    )
    backlog: int = field(
        default=DEFAULT_BACKLOG,
        metadata=_option("listen() backlog: connections the kernel queues before accept"),
    )
    shutdown_timeout: float = field(
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        metadata=_option(
            "seconds open connections get to finish echoing at shutdown before they are aborted",
        ),
    )
    write_buffer_high: int = field(
        default=DEFAULT_WRITE_BUFFER_HIGH,
        metadata=_option(
            "bytes queued for a client that does not read before the server stops reading from it",
        ),
    )

    def __post_init__(self) -> None:
        _check_str(self, "host", allow_empty=False)
        _check_int(self, "port", 0, 65535)
        _check_int(self, "backlog", 1, 65535)
        _check_seconds(self, "shutdown_timeout")
        _check_int(self, "write_buffer_high", 1024, 1 << 30)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The names of every option, in declaration order."""
        return tuple(f.name for f in fields(cls))


def option_flag(name: str) -> str:
    """The command-line flag of option `name` (`shutdown_timeout` -> `--shutdown-timeout`)."""
    return "--" + name.replace("_", "-")


def _check_str(config: ServerConfig, name: str, *, allow_empty: bool) -> None:
    value = getattr(config, name)
    if not isinstance(value, str):
        raise ConfigError(option_flag(name), f"expected a string, got {value!r}")
    if not allow_empty and not value:
        raise ConfigError(option_flag(name), "must not be empty")


def _check_int(config: ServerConfig, name: str, low: int, high: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(option_flag(name), f"expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(option_flag(name), f"{value} is out of range {low}..{high}")


def _check_seconds(config: ServerConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(option_flag(name), f"expected seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(option_flag(name), f"{value} is not a non-negative number of seconds")
