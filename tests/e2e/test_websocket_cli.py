"""`echo-async serve --listen ws://...` as a process: SIGTERM echoes what was sent, then 1001."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect

from tests.e2e.helpers import start_cli_server, stop_cli_server

IO_TIMEOUT_S = 10.0


def test_sigterm_echoes_what_was_sent_then_closes_with_going_away(tmp_path: Path) -> None:
    process, port = start_cli_server(
        ["--listen", "ws://127.0.0.1:0/echo", "--greeting", "hello from {port}"], tmp_path
    )
    try:
        with connect(f"ws://127.0.0.1:{port}/echo", open_timeout=IO_TIMEOUT_S) as ws:
            assert ws.recv(IO_TIMEOUT_S) == f"hello from {port}"
            ws.send(b"\x00binary\xff")
            assert ws.recv(IO_TIMEOUT_S) == b"\x00binary\xff"
            # Over loopback, send() returns once the bytes are in the server's kernel: the
            # drain that SIGTERM starts owes this message its echo.
            ws.send("sent before SIGTERM")
            process.send_signal(signal.SIGTERM)
            assert ws.recv(IO_TIMEOUT_S) == "sent before SIGTERM"
            with pytest.raises(ConnectionClosedOK):
                ws.recv(IO_TIMEOUT_S)
            assert (ws.close_code, ws.close_reason) == (1001, "going away")
        assert process.wait(IO_TIMEOUT_S) == 0
    finally:
        stop_cli_server(process)  # only if the test failed before the server exited
    (record,) = [r for r in process.records() if r["event"] == "connection closed"]
    assert record["transport"] == "ws"
    assert record["reason"] == "shutdown"
    assert record["close_code"] == 1001
    assert record["messages_in"] == record["messages_out"] == 2
    assert record["bytes_in"] == record["bytes_out"] == len(b"\x00binary\xff") + 19
