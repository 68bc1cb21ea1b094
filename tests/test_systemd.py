"""sd_notify against a datagram socket made by the test; LISTEN_FDS parsing."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from echo_async import systemd


def test_notify_sends_the_state_to_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": path})
        assert receiver.recv(100) == b"READY=1"


def test_notify_to_an_abstract_socket() -> None:
    name = f"echo-async-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        assert systemd.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert receiver.recv(100) == b"STOPPING=1"


def test_notify_is_a_no_op_outside_systemd(tmp_path: Path) -> None:
    assert not systemd.notify("READY=1", {})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": "relative/path"})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})


def test_listen_fds_ignores_another_processes_sockets() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert systemd.listen_fds(environ) == []
    assert environ["LISTEN_FDS"] == "1"  # not ours: left alone
    assert systemd.listen_fds({"LISTEN_PID": "x", "LISTEN_FDS": "1"}) == []
    assert systemd.listen_fds({}) == []
