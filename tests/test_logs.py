"""The CLI's log output: JSON lines by default off a terminal, never the payload."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from echo_async.logs import configure_logging, resolve_format


@pytest.fixture(autouse=True)
def _reset_structlog() -> object:
    yield
    structlog.reset_defaults()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_json_off_a_terminal_and_console_on_one() -> None:
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("auto", Terminal()) == "console"
    assert resolve_format("console", io.StringIO()) == "console"


def test_json_lines_with_level_and_timestamp() -> None:
    stream = io.StringIO()
    assert configure_logging("json", "info", stream) == "json"
    log = structlog.get_logger("echo_async")
    log.info("connection closed", peer="127.0.0.1:1", bytes_in=3)
    log.debug("connection opened")  # filtered at info
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "connection closed"
    assert record["level"] == "info"
    assert record["bytes_in"] == 3
    assert "timestamp" in record


def test_debug_level_shows_open_events() -> None:
    stream = io.StringIO()
    configure_logging("json", "debug", stream)
    structlog.get_logger("echo_async").debug("connection opened", peer="x:1")
    assert json.loads(stream.getvalue())["level"] == "debug"


def test_console_format() -> None:
    stream = io.StringIO()
    configure_logging("console", "info", stream)
    structlog.get_logger("echo_async").info("listening", addresses=["tcp://127.0.0.1:1"])
    assert "listening" in stream.getvalue()
    assert not stream.getvalue().lstrip().startswith("{")
