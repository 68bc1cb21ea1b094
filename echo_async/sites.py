"""Sites: one open listener each (TCP, TLS, Unix or UDP), started and closed by EchoServer.

A site is a value the server holds, not a branch inside it: `open_site()` binds a Listener and
returns a Site that knows its bound addresses and how to close. For TLS sites the loop runs the
handshake; failures are reported through the context's observer (see `tls.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import stat
from collections.abc import Callable
from typing import Any

from echo_async.config import ConfigError, ServerConfig
from echo_async.connection import format_address
from echo_async.listeners import Listener
from echo_async.udp import DatagramEcho

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]


class Site:
    """A bound listener: its asyncio.Server, or its datagram endpoint."""

    def __init__(
        self,
        listener: Listener,
        server: asyncio.Server | None = None,
        datagram: DatagramEcho | None = None,
        unix_inode: int | None = None,
    ) -> None:
        self.listener = listener
        self.server = server
        self.datagram = datagram
        self.unix_inode = unix_inode
        if server is not None:
            self.bound = [sock.getsockname() for sock in server.sockets]
        elif datagram is not None and datagram.own is not None:
            self.bound = [datagram.own]
        else:
            self.bound = []

    @property
    def addresses(self) -> list[str]:
        if self.listener.scheme == "unix":
            return [self.listener.url]
        return [f"{self.listener.scheme}://{format_address(a)}" for a in self.bound]

    def close(self) -> None:
        """Stop accepting (stream) or receiving (datagram)."""
        if self.server is not None:
            self.server.close()
        if self.datagram is not None and self.datagram.transport is not None:
            self.datagram.transport.close()

    async def wait_closed(self) -> None:
        if self.server is not None:
            await self.server.wait_closed()
        if self.unix_inode is not None:
            # Remove the socket file only if it is still the one we created.
            with contextlib.suppress(OSError):
                if os.lstat(self.listener.path).st_ino == self.unix_inode:
                    os.unlink(self.listener.path)


async def open_site(
    listener: Listener,
    config: ServerConfig,
    handler: StreamHandler,
    log: Any,
    sock: socket.socket | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Site:
    """Bind `listener` and start serving it; OSError or ConfigError when it can't be bound.

    For tls:// the loop runs the handshake (with `config.tls_handshake_timeout`) and the handler
    sees only connections whose handshake succeeded.
    """
    if listener.scheme == "unix":
        return await _open_unix(listener, config, handler)
    if listener.scheme == "udp":
        return await _open_datagram(listener, config, log)
    if sock is None and listener.host == "::":
        sock = _dual_stack_socket(socket.SOCK_STREAM, listener.port, config.reuse_port)
    tls: dict[str, Any] = {}
    if ssl_context is not None:
        tls = {"ssl": ssl_context, "ssl_handshake_timeout": config.tls_handshake_timeout}
    if sock is not None:
        server = await asyncio.start_server(handler, sock=sock, backlog=config.backlog, **tls)
    else:
        server = await asyncio.start_server(
            handler,
            host=listener.host,
            port=listener.port,
            backlog=config.backlog,
            reuse_address=True,
            reuse_port=config.reuse_port or None,
            **tls,
        )
    return Site(listener, server=server)


def _dual_stack_socket(kind: socket.SocketKind, port: int, reuse_port: bool) -> socket.socket:
    """`[::]` serving IPv6 and, where the OS allows, IPv4 (asyncio would set IPV6_V6ONLY)."""
    sock = socket.socket(socket.AF_INET6, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _open_unix(listener: Listener, config: ServerConfig, handler: StreamHandler) -> Site:
    path = listener.path
    _clear_stale_socket(listener)
    server = await asyncio.start_unix_server(handler, path, backlog=config.backlog)
    os.chmod(path, int(config.unix_mode, 8))
    return Site(listener, server=server, unix_inode=os.lstat(path).st_ino)


def _clear_stale_socket(listener: Listener) -> None:
    """Remove a leftover socket file nobody listens on; refuse anything else."""
    path = listener.path
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError("--listen", f"{listener.url}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: left by a process that is gone
            return
        except OSError as error:
            raise ConfigError("--listen", f"{listener.url}: {error.strerror or error}") from None
    raise ConfigError("--listen", f"{listener.url}: another process is listening on {path}")


async def _open_datagram(listener: Listener, config: ServerConfig, log: Any) -> Site:
    loop = asyncio.get_running_loop()
    protocol = DatagramEcho(
        config.udp_rate, config.udp_burst, log, drop=config.fault_drop, seed=config.fault_seed
    )
    if listener.host == "::":
        sock = _dual_stack_socket(socket.SOCK_DGRAM, listener.port, config.reuse_port)
        await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
    else:
        await loop.create_datagram_endpoint(
            lambda: protocol,
            local_addr=(listener.host, listener.port),
            reuse_port=config.reuse_port or None,
        )
    return Site(listener, datagram=protocol)
