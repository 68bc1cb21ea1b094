"""Listener URLs: `tcp://HOST:PORT`, `tls://HOST:PORT`, `udp://HOST:PORT`, `unix:///PATH`,
`ws://HOST:PORT[/PATH]` and `wss://HOST:PORT[/PATH]`.

A listener is a value: `ServerConfig.listen` holds their URLs, `EchoServer` starts one site per
listener. IPv6 hosts are written in brackets, `tcp://[::1]:12000`. For ws:// and wss:// the path
is the one WebSocket clients must ask for (`/` when the URL has none).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass

SCHEMES = ("tcp", "tls", "udp", "unix", "ws", "wss")
# Listeners whose connections start with a TLS handshake, and those that speak WebSocket.
TLS_SCHEMES = ("tls", "wss")
WEBSOCKET_SCHEMES = ("ws", "wss")
# Bytes a Unix socket path may have: sockaddr_un.sun_path (108 on Linux, 104 on macOS and the
# BSDs) less the NUL. A longer path fails only at bind, with an OSError that has no errno.
UNIX_PATH_MAX = (108 if sys.platform.startswith("linux") else 104) - 1


class ListenerError(ValueError):
    """A listener URL that can't be used; `str()` says why in one line."""


@dataclass(frozen=True, slots=True)
class Listener:
    """One place to listen: a scheme and either host and port, or a Unix socket path.

    `path` is the socket file for unix://, the request path for ws:// and wss://.
    """

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def url(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        return f"{self.scheme}://{bracket(self.host)}:{self.port}{self.path}"

    @property
    def is_stream(self) -> bool:
        return self.scheme != "udp"

    def with_port(self, port: int) -> Listener:
        return Listener(self.scheme, self.host, port, self.path)


def bracket(host: str) -> str:
    """IPv6 literals in brackets, as URLs and `host:port` strings write them."""
    return f"[{host}]" if ":" in host else host


def parse_listener(url: str) -> Listener:
    """Parse one listener URL; raises ListenerError naming what is wrong."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in SCHEMES:
        raise ListenerError(f"{url!r}: expected {', '.join(s + '://' for s in SCHEMES)}")
    if scheme == "unix":
        if not rest.startswith("/") or len(rest) < 2:
            raise ListenerError(f"{url!r}: expected an absolute path, unix:///run/echo.sock")
        if "\0" in rest:
            raise ListenerError(f"{url!r}: the path contains a NUL byte")
        size = len(os.fsencode(rest))
        if size > UNIX_PATH_MAX:
            raise ListenerError(
                f"{url!r}: the path is too long for a Unix socket "
                f"({size} bytes; the limit is {UNIX_PATH_MAX})"
            )
        return Listener("unix", path=rest)
    path = ""
    if scheme in WEBSOCKET_SCHEMES:
        rest, slash, tail = rest.partition("/")
        path = slash + tail or "/"
        # What a request line may carry as its path: visible ASCII, no query or fragment.
        if not all("!" <= char <= "~" for char in path) or "?" in path or "#" in path:
            raise ListenerError(f"{url!r}: the path must be visible ASCII without ? or #")
    host, port = _split_host_port(url, rest)
    return Listener(scheme, host, port, path)


def _split_host_port(url: str, text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket_end, port_text = text[1:].partition("]")
        if not bracket_end or not port_text.startswith(":"):
            raise ListenerError(f"{url!r}: expected [IPV6]:PORT")
        port_text = port_text[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ListenerError(f"{url!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ListenerError(f"{url!r}: expected HOST:PORT")
        if ":" in host:
            raise ListenerError(f"{url!r}: write IPv6 addresses in brackets, [{host}]")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ListenerError(f"{url!r}: port must be 0..65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
