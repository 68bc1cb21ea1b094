"""The CLI's log output: JSON lines by default off a terminal, never the payload."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
import re
import select
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import structlog

from echo_async.logs import configure_logging, library_logger, resolve_format
from tests.conftest import Records


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


class CountingStream(io.StringIO):
    """A stream that counts its writes (one per batch of lines)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_records_of_one_loop_iteration_are_written_together_in_order() -> None:
    stream = CountingStream()
    configure_logging("json", "info", stream)
    log = structlog.get_logger("echo_async")
    for number in range(5):
        log.info("connection closed", number=number)
    assert stream.getvalue() == ""  # not yet: at the end of this iteration
    await asyncio.sleep(0)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [record["number"] for record in records] == [0, 1, 2, 3, 4]
    assert stream.writes == 1


def test_records_outside_a_loop_are_written_at_once() -> None:
    stream = CountingStream()
    configure_logging("json", "info", stream)
    log = structlog.get_logger("echo_async")
    log.info("one")
    assert json.loads(stream.getvalue())["event"] == "one"
    log.warning("two")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["one", "two"]


def test_records_pending_in_a_loop_that_closed_are_written_by_the_next_one() -> None:
    stream = CountingStream()
    configure_logging("json", "info", stream)
    log = structlog.get_logger("echo_async")

    async def log_and_stop() -> None:
        log.info("inside")
        asyncio.get_running_loop().stop()

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(log_and_stop())
        loop.run_forever()  # stops before the flush callback runs
    finally:
        loop.close()
    assert task.done()
    assert stream.getvalue() == ""
    log.info("after")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == [
        "inside",
        "after",
    ]


def test_pending_records_are_written_at_exit() -> None:
    # The process leaves the loop (SystemExit) before the iteration's flush could run.
    script = textwrap.dedent(
        """
        import asyncio, sys, structlog
        from echo_async.logs import configure_logging
        configure_logging("json", "info")

        async def main():
            structlog.get_logger("echo_async").info("last words", n=1)
            sys.exit(3)

        asyncio.new_event_loop().run_until_complete(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["event"] == "last words"


def test_timestamp_is_iso_utc_with_microseconds_and_current() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    before = datetime.datetime.now(datetime.UTC)
    structlog.get_logger("echo_async").info("tick")
    after = datetime.datetime.now(datetime.UTC)
    stamp = json.loads(stream.getvalue())["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
    parsed = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before - datetime.timedelta(microseconds=1) <= parsed <= after


def test_fields_and_unserializable_values() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream, fields={"worker": 2})
    structlog.get_logger("echo_async").info("odd", value={1, 2}.__class__)
    record = json.loads(stream.getvalue())
    assert record["worker"] == 2
    assert record["value"] == repr(set)


class RawWrites(io.RawIOBase):
    """The bottom of a stream like stdout: each `write` here is one write(2) to the OS."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.writes.append(bytes(data))
        return len(self.writes[-1])


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_a_big_batch_reaches_the_os_in_whole_lines_a_pipe_keeps_whole(
    log_format: str,
) -> None:
    # The supervisor and its workers share one stdout. A pipe keeps a write of up to PIPE_BUF
    # bytes whole; a longer one can be split around another process's write, which then cuts
    # a line in two (one iteration's batch of close records easily passes 4 KiB).
    raw = RawWrites()
    stream = io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8")
    configure_logging(log_format, "info", stream)
    log = structlog.get_logger("echo_async")
    for number in range(100):
        log.info("connection closed", number=number, peer="127.0.0.1:51234", note="é" * 40)
    log.info("a long one", padding="x" * (select.PIPE_BUF + 100))
    await asyncio.sleep(0)
    for data in raw.writes:
        assert data.endswith(b"\n")
        assert len(data) <= select.PIPE_BUF or data.count(b"\n") == 1
    lines = b"".join(raw.writes).decode().splitlines()
    assert len(lines) == 101
    assert "a long one" in lines[-1]
    numbers = [int(re.findall(r"number\W+(\d+)", line)[0]) for line in lines[:-1]]
    assert numbers == list(range(100))


def test_json_lines_match_json_dumps_and_a_circular_value_fails_alone() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    log = structlog.get_logger("echo_async")
    fields = {"n": 1, "x": [1, 2.5, None, True], "text": 'é\n"', "nested": {"inf": float("inf")}}
    log.info("first", **fields)
    loop: dict[str, object] = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular"):
        log.info("circular", value=loop)
    # The same dict, no longer circular, logs fine: the failed call left no stale check behind.
    loop.clear()
    loop["n"] = 1
    log.info("after", value=loop)
    first, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert {key: first[key] for key in fields} == json.loads(json.dumps(fields))
    assert stream.getvalue().splitlines()[0] == json.dumps(first)
    assert after["value"] == {"n": 1}


# -- the library's logger: the host's structlog, else stdlib logging --------------------------


@pytest.fixture
def stdlib_records() -> Any:
    """A handler on a stdlib logger of our own, at DEBUG; structlog left unconfigured."""
    structlog.reset_defaults()
    logger = logging.getLogger("echo_async.test_logs")
    records = Records()
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(records)
    logger.setLevel(logging.NOTSET)


def test_unconfigured_structlog_sends_records_to_stdlib_logging(
    stdlib_records: Records, capsys: pytest.CaptureFixture[str]
) -> None:
    log = library_logger("echo_async.test_logs")
    log.info("connection closed", peer="127.0.0.1:1", bytes_in=3, error="no PROXY header")
    (record,) = stdlib_records.records
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        'connection closed peer=127.0.0.1:1 bytes_in=3 error="no PROXY header"'
    )
    assert record.__dict__["peer"] == "127.0.0.1:1"
    assert record.__dict__["bytes_in"] == 3
    assert capsys.readouterr().out == ""
    assert not structlog.is_configured()


def test_the_stdlib_logger_level_decides_and_is_enabled_for_follows_it(
    stdlib_records: Records,
) -> None:
    logging.getLogger("echo_async.test_logs").setLevel(logging.INFO)
    log = library_logger("echo_async.test_logs")
    assert not log.is_enabled_for(logging.DEBUG)
    assert log.is_enabled_for(logging.INFO)
    log.debug("connection opened")
    assert stdlib_records.records == []
    logging.getLogger("echo_async.test_logs").setLevel(logging.DEBUG)
    assert log.is_enabled_for(logging.DEBUG)


def test_stdlib_records_keep_tracebacks_and_survive_fields_a_log_record_owns(
    stdlib_records: Records,
) -> None:
    log = library_logger("echo_async.test_logs")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("accounting failed", name="n", message="m", args=[1])
    (record,) = stdlib_records.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError
    assert record.name == "echo_async.test_logs"  # the field did not overwrite it
    assert record.getMessage() == "accounting failed name=n message=m args=[1]"


def test_configured_structlog_is_used_and_stdlib_logging_gets_nothing(
    stdlib_records: Records,
) -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)  # what the CLI does
    library_logger("echo_async.test_logs").info("connection closed", bytes_in=3)
    assert json.loads(stream.getvalue())["bytes_in"] == 3
    assert stdlib_records.records == []
