"""systemd integration: sd_notify readiness and socket activation (LISTEN_FDS), stdlib only.

Both follow the documented protocols (sd_notify(3), sd_listen_fds(3)); neither needs libsystemd.
Outside systemd (no NOTIFY_SOCKET, no LISTEN_FDS) every function is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

SD_LISTEN_FDS_START = 3


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1") to $NOTIFY_SOCKET; False when not under systemd or on error."""
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not address or address[0] not in ("/", "@"):
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed us (LISTEN_PID/LISTEN_FDS), as socket objects.

    Returns [] unless LISTEN_PID is this process. The variables are removed afterwards so child
    processes don't take the sockets as theirs, as sd_listen_fds(unset_environment=1) does.
    """
    env = environ if environ is not None else os.environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid() or count <= 0:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
