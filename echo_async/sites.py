"""Sites: one open listener each, started and closed by EchoServer.

A site is a value the server holds, one class per kind of listener, not a branch inside the
server: `StreamSite` serves tcp://, tls://, unix://, ws:// and wss:// through
`asyncio.start_server` (tls:// and wss:// are accepted plain and upgraded by the server's state,
so its limits count handshakes; ws:// connections speak WebSocket once accepted);
`DatagramSite` serves udp://. `open_site()` binds a Listener; `open_inherited_site()` serves a
socket someone else bound (systemd socket activation) as the kind of listener it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Callable, Sequence
from typing import Any

from echo_async.config import ConfigError, ServerConfig
from echo_async.connection import format_address
from echo_async.listeners import Listener
from echo_async.udp import DatagramEcho

# What a TCP socket handed over by systemd can be served as.
INHERITABLE_SCHEMES = ("tcp", "tls", "ws", "wss")

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
HandlerFor = Callable[[Listener], StreamHandler]


class Site:
    """A bound listener: where it listens, how to stop it."""

    datagram: DatagramEcho | None = None

    def __init__(self, listener: Listener, bound: list[Any]) -> None:
        self.listener = listener
        self.bound = bound

    @property
    def addresses(self) -> list[str]:
        if self.listener.scheme == "unix":
            return [self.listener.url]
        # ws:// and wss:// with their path, so an address is a URL a client can open.
        path = self.listener.path
        return [f"{self.listener.scheme}://{format_address(a)}{path}" for a in self.bound]

    def close(self) -> None:
        """Stop accepting (stream) or receiving (datagram)."""

    def stop_polling(self) -> bool:
        """Stop accepting before close(), where that needs a turn of the loop (see StreamSite)."""
        return False

    async def wait_closed(self) -> None:
        """Wait until the listener is gone (the caller bounds the wait)."""

    def remove_files(self) -> None:
        """Remove what the site created on disk (a Unix socket file)."""


class StreamSite(Site):
    """tcp://, tls://, unix://, ws:// or wss:// through an asyncio.Server."""

    def __init__(
        self, listener: Listener, server: asyncio.Server, unix_inode: int | None = None
    ) -> None:
        super().__init__(listener, [sock.getsockname() for sock in server.sockets])
        self.server = server
        self.unix_inode = unix_inode

    def close(self) -> None:
        self.server.close()

    def stop_polling(self) -> bool:
        """Stop accepting without closing, where the loop allows it; True if it did.

        asyncio's selector loop accepts a socket in one callback and builds its transport in a
        task on the next turn; closing the Server between the two leaves that transport
        attached to a closed Server (on 3.13.0 it then outlives the loop, unclosed). Removing
        the listening sockets' readers first, and letting those tasks run, avoids the gap.
        uvloop accepts and builds the transport in one step: nothing to do there.
        """
        loop = asyncio.get_running_loop()
        if not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            return False
        for sock in self.server.sockets:
            loop.remove_reader(sock.fileno())
        return True

    async def wait_closed(self) -> None:
        await self.server.wait_closed()

    def remove_files(self) -> None:
        if self.unix_inode is not None:
            # Remove the socket file only if it is still the one we created.
            with contextlib.suppress(OSError):
                if os.lstat(self.listener.path).st_ino == self.unix_inode:
                    os.unlink(self.listener.path)
            self.unix_inode = None


class DatagramSite(Site):
    """udp:// through a datagram endpoint."""

    def __init__(self, listener: Listener, datagram: DatagramEcho) -> None:
        super().__init__(listener, [datagram.own] if datagram.own is not None else [])
        self.datagram = datagram

    def close(self) -> None:
        assert self.datagram is not None
        if self.datagram.transport is not None:
            self.datagram.transport.close()


async def open_site(
    listener: Listener, config: ServerConfig, handler_for: HandlerFor, log: Any
) -> Site:
    """Bind `listener` and start serving it; OSError or ConfigError when it can't be bound."""
    if listener.scheme == "unix":
        path = listener.path
        _clear_stale_socket(listener)
        handler = handler_for(listener)
        server = await asyncio.start_unix_server(handler, path, backlog=config.backlog)
        os.chmod(path, int(config.unix_mode, 8))
        return StreamSite(listener, server, unix_inode=os.lstat(path).st_ino)
    if listener.scheme == "udp":
        if listener.host == "::":
            sock = _dual_stack_socket(socket.SOCK_DGRAM, listener.port, config.reuse_port)
            return await _open_datagram(listener, config, log, sock=sock)
        return await _open_datagram(listener, config, log)
    handler = handler_for(listener)
    if listener.host == "::":
        sock = _dual_stack_socket(socket.SOCK_STREAM, listener.port, config.reuse_port)
        server = await asyncio.start_server(handler, sock=sock, backlog=config.backlog)
    else:
        server = await asyncio.start_server(
            handler,
            host=listener.host,
            port=listener.port,
            backlog=config.backlog,
            reuse_address=True,
            reuse_port=config.reuse_port or None,
        )
    return StreamSite(listener, server)


async def open_inherited_site(
    sock: socket.socket, config: ServerConfig, handler_for: HandlerFor, log: Any
) -> Site:
    """Serve an already-bound socket (socket activation, a supervisor) as what it is."""
    listener = inherited_listener(sock, config.listeners)
    if listener.scheme == "udp":
        return await _open_datagram(listener, config, log, sock=sock)
    handler = handler_for(listener)
    if listener.scheme == "unix":
        server = await asyncio.start_unix_server(handler, sock=sock, backlog=config.backlog)
    else:
        server = await asyncio.start_server(handler, sock=sock, backlog=config.backlog)
    return StreamSite(listener, server)


def inherited_listener(sock: socket.socket, configured: Sequence[Listener]) -> Listener:
    """The listener an inherited socket is: from its family and type, and for TCP the config.

    A TCP socket is what the configured tcp://, tls://, ws:// and wss:// listeners say: the one
    with the socket's port, else the only one configured. Raises ConfigError for a socket that
    can't be served or whose kind is ambiguous.
    """
    where = f"inherited socket (fd {sock.fileno()})"
    if sock.family == socket.AF_UNIX:
        if sock.type != socket.SOCK_STREAM:
            raise ConfigError("LISTEN_FDS", f"{where}: only stream Unix sockets can be served")
        name = sock.getsockname()
        path = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        return Listener("unix", path=path or "(unnamed)")
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ConfigError("LISTEN_FDS", f"{where}: address family {sock.family!r} is not served")
    host, port = sock.getsockname()[:2]
    if sock.type == socket.SOCK_DGRAM:
        return Listener("udp", host, port)
    if sock.type != socket.SOCK_STREAM:
        raise ConfigError("LISTEN_FDS", f"{where}: socket type {sock.type!r} is not served")
    streams = [listener for listener in configured if listener.scheme in INHERITABLE_SCHEMES]
    candidates = [listener for listener in streams if listener.port == port] or streams
    kinds = {(listener.scheme, listener.path) for listener in candidates} or {("tcp", "")}
    if len(kinds) > 1:
        urls = ", ".join(sorted(f"{scheme}://{path}" for scheme, path in kinds))
        raise ConfigError(
            "--listen",
            f"{where} on {format_address((host, port))}: the configured listeners ({urls}) "
            f"don't say which it is, and none has port {port}; list it with that port",
        )
    scheme, path = kinds.pop()
    return Listener(scheme, host, port, path)


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


async def _open_datagram(
    listener: Listener, config: ServerConfig, log: Any, sock: socket.socket | None = None
) -> Site:
    loop = asyncio.get_running_loop()
    protocol = DatagramEcho(
        config.udp_rate, config.udp_burst, log, drop=config.fault_drop, seed=config.fault_seed
    )
    if sock is not None:
        sock.setblocking(False)
        await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
    else:
        await loop.create_datagram_endpoint(
            lambda: protocol,
            local_addr=(listener.host, listener.port),
            reuse_port=config.reuse_port or None,
        )
    return DatagramSite(listener, protocol)
