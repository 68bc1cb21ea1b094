"""The server's TLS context: TLS 1.2 at least, optional client certificates (mutual TLS).

Certificate problems are the user's to fix, so they raise ConfigError naming the option; the
context is built before anything is bound, so a bad certificate starts nothing.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable

from echo_async.config import ConfigError, ServerConfig

HandshakeObserver = Callable[[str], None]
INCOMPLETE_HANDSHAKE = "handshake not completed (timed out, or the client went away)"


class ObservedSSLObject(ssl.SSLObject):
    """An SSLObject that reports failed handshakes to its context's observer.

    The event loop runs the handshake (start_server(ssl=...)) and, on failure, only logs at
    debug level; this hook is how a plaintext client, a refused TLS version, a handshake timeout
    or a client gone mid-handshake becomes a logged, counted event. Set through the documented
    `SSLContext.sslobject_class`. A handshake that started and neither finished nor failed is
    reported when the object is freed: that is how timeouts show up.
    """

    handshake_state = "new"  # new -> started -> done | reported

    def do_handshake(self) -> None:
        if self.handshake_state == "new":
            self.handshake_state = "started"
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as error:
            self._report(_reason(error))
            raise
        self.handshake_state = "done"

    def _report(self, detail: str) -> None:
        if self.handshake_state in ("done", "reported"):
            return
        self.handshake_state = "reported"
        observer = getattr(self.context, "handshake_observer", None)
        if observer is not None:
            observer(detail)

    def __del__(self) -> None:
        if self.handshake_state == "started":
            # Freed at any time, even at interpreter exit: a report must never raise here.
            with contextlib.suppress(Exception):
                self._report(INCOMPLETE_HANDSHAKE)


class ServerContext(ssl.SSLContext):
    """An SSLContext carrying the observer of failed handshakes."""

    handshake_observer: HandshakeObserver | None = None


def server_context(
    config: ServerConfig, observer: HandshakeObserver | None = None
) -> ssl.SSLContext:
    """An SSLContext for tls:// listeners from `config.tls_cert`, `tls_key`, `tls_client_ca`."""
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslobject_class = ObservedSSLObject
    context.handshake_observer = observer
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
    return context


def _reason(error: Exception) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.lower().replace("_", " ")
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error).splitlines()[0] if str(error) else type(error).__name__
