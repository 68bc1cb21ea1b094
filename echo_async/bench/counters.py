"""Counters: what one process's bench clients count, read by the driver at every tick."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl

from echo_async.bench.histogram import Histogram

UNLIMITED = 1 << 62

# OpenSSL's reasons for a handshake that met bytes which are not TLS: plaintext such as a
# greeting line (WRONG_VERSION_NUMBER; RECORD_LAYER_FAILURE or PACKET_LENGTH_TOO_LONG in newer
# OpenSSL), or our own ClientHello sent back by a plaintext echo server (UNEXPECTED_MESSAGE).
NOT_TLS_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "UNKNOWN_PROTOCOL",
        "UNEXPECTED_MESSAGE",
        "UNEXPECTED_RECORD",
    }
)


class Counters:
    """Totals the client protocols add to on their hot path, shared by one process's clients.

    ``budget`` is how many more messages may be sent (``--requests``), ``target`` how many round
    trips end the run; both are effectively infinite for ``--duration`` runs, so the hot path
    needs no branch on the run kind. ``finished`` is set when the run should end early.
    ``backends`` counts connections per greeting line; it stays empty without ``--greeting``.
    """

    __slots__ = (
        "backends",
        "budget",
        "connections_made",
        "connections_open",
        "echoed_bytes",
        "error_kinds",
        "errors",
        "finished",
        "first_mismatch",
        "latency",
        "mismatched_bytes",
        "round_trips",
        "stopping",
        "target",
    )

    def __init__(self, requests: int | None = None) -> None:
        self.budget = UNLIMITED if requests is None else requests
        self.target = UNLIMITED if requests is None else requests
        self.round_trips = 0
        self.echoed_bytes = 0
        self.connections_made = 0
        self.connections_open = 0
        self.errors = 0
        self.mismatched_bytes = 0
        self.latency = Histogram()
        self.error_kinds: dict[str, int] = {}
        self.first_mismatch: str | None = None
        self.backends: dict[str, int] = {}  # greeting line -> connections (--greeting)
        self.finished = asyncio.Event()
        self.stopping = False

    def error(self, kind: str) -> None:
        """Count one error of the given kind (a short human-readable phrase)."""
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def mismatch(self, count: int, description: str) -> None:
        """Count ``count`` wrongly echoed bytes; the first description is kept for the report."""
        if count <= 0:
            return
        self.mismatched_bytes += count
        if self.first_mismatch is None:
            self.first_mismatch = description


def describe(exc: BaseException | None, *, handshake: bool = False) -> str:
    """A short phrase for why a connection ended or failed, used to group errors.

    ``handshake``: ``exc`` ended a TLS handshake, so a reply that was not TLS means the server
    speaks plaintext (after the handshake the same reasons mean something else).
    """
    if exc is None:
        return "connection closed by the server"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        if handshake and exc.reason in NOT_TLS_REASONS:
            return f"TLS: the server did not speak TLS ({exc.reason})"
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        # os.strerror, not exc.strerror: asyncio puts the address in the latter, and errors
        # are grouped by this text.
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{os.strerror(exc.errno)} ({name})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def cannot_resolve(host: str, exc: socket.gaierror) -> str:
    """The one line for a host name that does not resolve (not "Unknown error -2")."""
    return f"cannot resolve {host}: {exc.strerror or exc}"
