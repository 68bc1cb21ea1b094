"""TLS for tls:// listeners: the context, the upgrade of an accepted socket, what was negotiated.

A tls:// connection is accepted as plain TCP, admitted like any other (so the limits count
handshakes in flight), may send a PROXY header, and is then upgraded with `loop.start_tls()`:
the handshake runs in a task the server owns, and its failures are reported from there.
Certificate problems are the user's to fix, so they raise ConfigError naming the option; the
context is built before anything is bound, so a bad certificate starts nothing.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from echo_async.config import ConfigError, ServerConfig

# RFC 4514 short names of the attributes a client certificate's subject usually has.
_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}
# Beyond the handshake timeout, how long the upgrade waits for start_tls() to give up.
_HANDSHAKE_GRACE_S = 1.0
# How many loop iterations the upgrade waits for start_tls() to be ready for early bytes.
_READY_TURNS = 8


def server_context(config: ServerConfig) -> ssl.SSLContext:
    """An SSLContext for tls:// listeners from `config.tls_cert`, `tls_key`, `tls_client_ca`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sni_callback = _note_server_name
    for option, path in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            reason = (error.strerror or str(error)).lower()
            raise ConfigError(option, f"cannot read {path}: {reason}") from None
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(
            "--tls-cert",
            f"cannot load {config.tls_cert} with key {config.tls_key}: {_reason(error)}",
        ) from None
    if config.tls_client_ca:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(
                "--tls-client-ca", f"cannot load {config.tls_client_ca}: {_reason(error)}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    if config.alpn_protocols:
        context.set_alpn_protocols(config.alpn_protocols)
    return context


def _note_server_name(ssl_object: Any, server_name: str | None, context: ssl.SSLContext) -> None:
    # The SNI name is only told to this callback; keep it on the connection's SSLObject.
    if server_name is not None:
        ssl_object.echo_server_name = server_name


async def upgrade(
    transport: asyncio.BaseTransport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    timeout: float,
    take_early: Callable[[asyncio.Transport | None], bytes],
) -> asyncio.Transport | None:
    """Run the server side of a TLS handshake on an accepted plain transport.

    Returns the TLS transport, or None when the client closed during the handshake; raises
    what the handshake raised. `take_early(tls_transport)` is called once the TLS layer has
    the socket: it returns the bytes already read from it (with a PROXY header, or before the
    TLS layer took over), which reach the TLS layer before anything read later, and it is told
    the TLS transport (None if the loop hides it), whose data may reach the protocol before
    this coroutine returns. The caller pauses reading on `transport` first.
    """
    loop = asyncio.get_running_loop()
    if transport.is_closing():
        return None  # the client went away before the TLS layer could take over
    handshake = asyncio.ensure_future(
        loop.start_tls(
            transport,  # type: ignore[arg-type]  # uvloop's transports are not asyncio's classes
            protocol,
            context,
            server_side=True,
            ssl_handshake_timeout=timeout,
        )
    )
    # start_tls() hands the socket to its TLS protocol, then calls connection_made and
    # resume_reading from the loop's ready queue. Early bytes must be fed after the first and
    # before the socket is next read: the first turn of this task that sees the transport
    # reading again is in that same batch of callbacks, before the loop polls for I/O.
    try:
        for _ in range(_READY_TURNS):
            await asyncio.sleep(0)
            if handshake.done() or transport.is_closing():
                break
            if transport.is_reading():  # type: ignore[attr-defined]
                tls_protocol = transport.get_protocol()
                early = take_early(tls_transport(tls_protocol))
                if early:
                    _feed(tls_protocol, early)
                break
        take_early(None)
        # start_tls() enforces `timeout` itself; this bound only keeps a loop that never
        # wakes its waiter (a transport lost at the wrong moment) from holding us for ever.
        return await asyncio.wait_for(handshake, timeout + _HANDSHAKE_GRACE_S)
    except BaseException:
        handshake.cancel()
        raise


def tls_transport(tls_protocol: Any) -> asyncio.Transport | None:
    """The transport start_tls() will return, known as soon as its TLS protocol exists.

    The TLS layer delivers data received with the client's last handshake message before
    start_tls() returns; the connection must then already be able to write its echo (on
    TLS a write after the client's close_notify is dropped). Both loops' SSLProtocol create
    that transport up front and return it from the private `_get_app_transport()`; where
    that is missing, None (the connection then holds such data until start_tls returns).
    """
    get_app_transport = getattr(tls_protocol, "_get_app_transport", None)
    if get_app_transport is None:
        return None
    try:
        return get_app_transport()  # type: ignore[no-any-return]
    except Exception:
        return None


def _feed(protocol: Any, data: bytes) -> None:
    """Deliver `data` to a (buffered) protocol as if the socket had just read it."""
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


def session_fields(transport: asyncio.BaseTransport) -> dict[str, str]:
    """What was negotiated, for the close record: version, cipher, SNI, ALPN, client subject."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return {}
    fields = {"tls_version": str(ssl_object.version()), "tls_cipher": ssl_object.cipher()[0]}
    server_name = getattr(ssl_object, "echo_server_name", None)
    if server_name:
        fields["tls_sni"] = server_name
    alpn = ssl_object.selected_alpn_protocol()
    if alpn:
        fields["tls_alpn"] = alpn
    certificate = ssl_object.getpeercert()
    if certificate:
        fields["tls_client_subject"] = subject_text(certificate.get("subject", ()))
    return fields


def subject_text(subject: Any) -> str:
    """A certificate subject as RFC 4514 text, most specific first: `CN=client,O=Example`."""
    parts = []
    for rdn in reversed(subject):
        parts.append(
            "+".join(f"{_SHORT_NAMES.get(name, name)}={_escape(value)}" for name, value in rdn)
        )
    return ",".join(parts)


def _escape(value: str) -> str:
    escaped = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if escaped.startswith((" ", "#")):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped


def handshake_error(error: BaseException | None, timeout: float) -> str:
    """One line saying why a handshake failed."""
    if error is None or isinstance(error, ConnectionResetError | BrokenPipeError):
        return "handshake not completed: the client went away"
    if isinstance(error, TimeoutError) or (
        isinstance(error, ConnectionAbortedError) and "longer" in str(error)
    ):
        return f"handshake not completed within {timeout:g} s"
    if isinstance(error, ConnectionError):
        return "handshake not completed: the connection was closed"
    return _reason(error)


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.lower().replace("_", " ")
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error).splitlines()[0] if str(error) else type(error).__name__
