"""A Locust user for echo servers: load beyond one machine (``pip install 'echo-async[locust]'``).

Subclass :class:`EchoUser` in a locustfile (it is abstract, like Locust's ``HttpUser``)::

    from echo_async.locust import EchoUser

    class Echo(EchoUser):
        pass

and run ``locust -f locustfile.py --host tcp://127.0.0.1:12000 --echo-size 1KiB``. Each echo is
one Locust request: type ``TCP`` or ``TLS``, name such as ``pingpong 1024 B``, with its response
time and length. Bytes that differ from those sent (the pattern ``echo-async bench`` sends), a
short read, a reset or a timeout make it a failure whose message says which, and where.

It runs inside Locust's gevent: plain blocking sockets, which gevent makes cooperative, and no
asyncio loop. Importing this module imports ``locust``, which monkey-patches the process, so
import it from a locustfile only; ``import echo_async`` never imports it.
"""

from __future__ import annotations

import argparse
import itertools
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from locust import User, constant, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

from echo_async.bench import pattern
from echo_async.bench.cli import byte_size
from echo_async.bench.counters import cannot_resolve, describe

__all__ = ["EchoError", "EchoMismatch", "EchoSettings", "EchoSettingsError", "EchoUser"]

Mode = Literal["pingpong", "oneshot"]
MODES: tuple[Mode, ...] = get_args(Mode)
DEFAULT_MODE: Mode = "pingpong"
DEFAULT_SIZE = 1024
DEFAULT_TIMEOUT = 10.0
HOST_FORM = "tcp://HOST:PORT or tls://HOST:PORT"
FLIGHT = 256 * 1024
"""Bytes sent and not yet echoed, at most: ``echo-async bench``'s stream window."""

_connection_numbers = itertools.count()  # picks each connection's pattern start, per process


class EchoSettingsError(ValueError):
    """An invalid --host or --echo-* option; the message names it."""


class EchoError(Exception):
    """Why one echo failed; Locust records it as the request's failure.

    Locust groups failures by this text, so it names the place (byte offset, how many bytes came
    back) and leaves out what varies from one echo to the next.
    """

    def __init__(self, message: str, received: int = 0) -> None:
        super().__init__(message)
        self.received = received


class EchoMismatch(EchoError):
    """Every byte came back, but not as sent; the connection stays usable."""


@dataclass(frozen=True, slots=True)
class EchoSettings:
    """What the EchoUsers of a test do: the server from --host, the rest from --echo-* options."""

    host: str
    port: int
    tls: bool = False
    mode: Mode = DEFAULT_MODE
    size: int = DEFAULT_SIZE
    timeout: float = DEFAULT_TIMEOUT
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EchoSettingsError(f"--echo-mode must be one of {', '.join(MODES)}")
        if self.size < 1:
            raise EchoSettingsError("--echo-size must be at least 1 byte")
        if not 0 < self.timeout < float("inf"):
            raise EchoSettingsError("--echo-timeout must be a positive number of seconds")
        if self.tls_ca is not None and not self.tls:
            raise EchoSettingsError(f"--echo-tls-ca needs a tls:// --host, not {self.target}")

    @classmethod
    def from_options(cls, url: str | None, options: argparse.Namespace | None) -> EchoSettings:
        """Settings from a --host URL and Locust's parsed options (defaults where absent).

        Options may come from Locust's web UI, which converts types but checks nothing else.
        """
        if not url:
            raise EchoSettingsError(f"give the echo server as --host {HOST_FORM}")
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("tcp", "tls") or not parts.hostname or not port or parts.path:
            raise EchoSettingsError(f"--host must be {HOST_FORM}, not {url!r}")
        values = vars(options) if options is not None else {}
        return cls(
            host=parts.hostname,
            port=port,
            tls=parts.scheme == "tls",
            mode=values.get("echo_mode", DEFAULT_MODE),
            size=values.get("echo_size", DEFAULT_SIZE),
            timeout=values.get("echo_timeout", DEFAULT_TIMEOUT),
            # The web UI sends an empty field as "".
            tls_ca=values.get("echo_tls_ca") or None,
        )

    @property
    def target(self) -> str:
        """The server as a URL, tcp:// or tls://."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'tls' if self.tls else 'tcp'}://{host}:{self.port}"

    @property
    def request_type(self) -> str:
        """Locust's request type (its "method" column): TCP or TLS."""
        return "TLS" if self.tls else "TCP"

    @property
    def request_name(self) -> str:
        """Locust's request name: the mode and the message size, e.g. ``pingpong 1024 B``."""
        return f"{self.mode} {self.size} B"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context: verifying against ``tls_ca`` if given, else accepting any
        certificate (as ``echo-async bench`` does: test servers are often self-signed).
        """
        return _client_context(self.tls_ca) if self.tls else None


@cache
def _client_context(tls_ca: str | None) -> ssl.SSLContext:
    if tls_ca is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise EchoSettingsError(f"--echo-tls-ca {tls_ca}: {exc}") from exc


class EchoConnection:
    """One blocking connection to the server and where its bytes sit in the bench pattern.

    Byte ``i`` of the stream is pattern byte ``origin + i``, so an echo is checked by comparing
    it with the pattern window it was cut from, and a difference has an exact offset.
    """

    __slots__ = ("buffer", "origin", "sent", "sock", "view")

    def __init__(self, settings: EchoSettings) -> None:
        """Connect (and, for tls://, shake hands) or raise EchoError saying why not."""
        try:
            sock = socket.create_connection(
                (settings.host, settings.port), timeout=settings.timeout
            )
        except socket.gaierror as exc:
            raise EchoError(f"connect: {cannot_resolve(settings.host, exc)}") from None
        except OSError as exc:
            raise EchoError(f"connect: {describe(exc)}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            context = settings.ssl_context()
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=settings.host)
        except OSError as exc:
            sock.close()
            raise EchoError(f"connect: {describe(exc, handshake=True)}") from None
        self.sock = sock
        self.origin = pattern.start_position(next(_connection_numbers))
        self.sent = 0
        self.buffer = bytearray(settings.size)
        self.view = memoryview(self.buffer)

    def echo(self, timeout: float) -> int:
        """Send the next message, read it back and check it; return its length.

        Raises EchoMismatch if bytes differ, EchoError if fewer came back (closed, reset,
        nothing within ``timeout`` seconds): the connection is then out of step, close it.
        """
        sock, view = self.sock, self.view
        size = len(view)
        expected = pattern.window(self.origin + self.sent, size)
        outgoing = memoryview(expected)
        sent = received = 0
        started, deadline = time.monotonic(), 0.0
        try:
            while True:
                # At most FLIGHT bytes unanswered: a large message is sent in steps, so that
                # sending never waits on a server that waits for us to read.
                if sent < size and (end := min(size, received + FLIGHT)) > sent:
                    sock.sendall(outgoing[sent:end])
                    sent = end
                count = sock.recv_into(view[received:])
                received += count
                if not count or received == size:
                    break
                # In pieces: the timeout becomes a deadline for the whole echo.
                deadline = deadline or started + timeout
                sock.settimeout(max(deadline - time.monotonic(), 1e-6))
        except TimeoutError:
            message = f"no echo within {timeout:g} s: {received} of {size} bytes"
            raise EchoError(message, received) from None
        except OSError as exc:
            raise EchoError(f"{describe(exc)} after {received} of {size} bytes", received) from None
        if deadline:
            sock.settimeout(timeout)
        if received < size:
            raise EchoError(f"connection closed after {received} of {size} bytes", received)
        self.sent += size
        if self.buffer != expected:
            wrong, where = pattern.differences(bytes(self.buffer), expected)
            raise EchoMismatch(
                f"echo differs from what was sent at byte {where} of {size} "
                f"({wrong} byte{'s' if wrong > 1 else ''} wrong)",
                received,
            )
        return received

    def close(self) -> None:
        self.sock.close()


class EchoUser(User):
    """A Locust user that echoes ``--echo-size`` bytes to ``--host`` and checks them.

    ``pingpong`` (the default) keeps one connection and echoes on it back to back; after a
    short read, reset or timeout it reconnects for the next echo. ``oneshot`` connects, echoes
    once and closes for every request (the textbook client), so its response time includes the
    connection (and TLS handshake). Abstract: subclass it in a locustfile; set ``wait_time`` to
    pace users (the default sends the next echo as soon as the last one is back).
    """

    abstract = True
    wait_time = constant(0)

    settings: EchoSettings
    connection: EchoConnection | None = None

    def on_start(self) -> None:
        self.settings = EchoSettings.from_options(self.host, self.environment.parsed_options)

    def on_stop(self) -> None:
        self._hang_up()

    @task
    def echo(self) -> None:
        """One echo, reported to Locust as one request, success or failure."""
        settings = self.settings
        started = time.perf_counter()
        try:
            if settings.mode == "oneshot":
                connection = EchoConnection(settings)
                try:
                    length = connection.echo(settings.timeout)
                finally:
                    connection.close()
            else:
                if self.connection is None:
                    self.connection = EchoConnection(settings)
                    # Connecting is not part of a pingpong round trip.
                    started = time.perf_counter()
                length = self.connection.echo(settings.timeout)
        except EchoMismatch as exc:
            self._report(started, exc.received, exc)
        except EchoError as exc:
            self._hang_up()
            self._report(started, exc.received, exc)
        else:
            self._report(started, length, None)

    def _report(self, started: float, length: int, failure: EchoError | None) -> None:
        self.environment.events.request.fire(
            request_type=self.settings.request_type,
            name=self.settings.request_name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=failure,
            context=self.context(),
        )

    def _hang_up(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def _positive_size(text: str) -> int:
    size = byte_size(text)
    if size < 1:
        raise argparse.ArgumentTypeError("must be at least 1 byte")
    return size


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return seconds


def _add_arguments(parser: Any, **_kwargs: Any) -> None:
    # Locust's own add_argument (not a group's) puts each option in the web UI too.
    parser.add_argument(
        "--echo-mode",
        choices=MODES,
        default=DEFAULT_MODE,
        help="pingpong: one kept connection per user, echo after echo; "
        "oneshot: connect, echo once, close, per request",
    )
    parser.add_argument(
        "--echo-size",
        type=_positive_size,
        default=DEFAULT_SIZE,
        metavar="BYTES",
        help="bytes per echo, e.g. 64, 1KiB, 1MiB (the web UI takes a number of bytes)",
    )
    parser.add_argument(
        "--echo-timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="an echo (or a connection) that takes longer fails",
    )
    parser.add_argument(
        "--echo-tls-ca",
        metavar="FILE",
        default=None,
        help="with --host tls://...: verify the server certificate and host name against FILE "
        "(without it any certificate is accepted)",
    )


def _check_options(environment: Environment, **_kwargs: Any) -> None:
    """Refuse a bad --host or --echo-tls-ca before any load, in one line (exit status 2)."""
    if isinstance(environment.runner, WorkerRunner):
        return  # a worker takes the master's host and options
    options = environment.parsed_options
    headless = bool(options is not None and options.headless)
    for user_class in environment.user_classes:
        url = environment.host or user_class.host
        if not issubclass(user_class, EchoUser) or (url is None and not headless):
            continue  # without --headless, the web UI asks for the host
        try:
            EchoSettings.from_options(url, options).ssl_context()
        except EchoSettingsError as exc:
            # How Locust's own option errors end (argparse): an exception here would print a
            # traceback around the one line that matters.
            sys.stderr.write(f"locust: error: {exc}\n")
            raise SystemExit(2) from None


# Locust's EventHook.add_listener has no annotations; as a decorator it would untype the listeners.
events.init_command_line_parser.add_listener(_add_arguments)  # type: ignore[no-untyped-call]
events.init.add_listener(_check_options)  # type: ignore[no-untyped-call]
