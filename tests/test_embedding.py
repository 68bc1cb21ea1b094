"""An application embedding EchoServer: its logging set-up decides; the documented API exists."""

from __future__ import annotations

import ast
import importlib
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

import echo_async
from echo_async import EchoServer, ServerConfig
from tests.conftest import Records, echo_once

ROOT = Path(__file__).resolve().parent.parent
EMBEDDING = ROOT / "docs" / "embedding.md"
# The UDP listener beyond loopback makes the server log a WARNING at start.
CONFIG = ServerConfig(listen=("tcp://127.0.0.1:0", "udp://0.0.0.0:0"), shutdown_timeout=2)


@pytest.fixture
def host() -> Iterator[None]:
    """An application that has not configured structlog; its logging set-up is undone after."""
    structlog.reset_defaults()
    root = logging.getLogger()
    ours = logging.getLogger("echo_async")
    saved = (list(root.handlers), root.level, list(ours.handlers), ours.level)
    try:
        yield
    finally:
        for handler in set(root.handlers) - set(saved[0]):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved[1])
        ours.handlers[:] = saved[2]
        ours.setLevel(saved[3])
        structlog.reset_defaults()


def basic_config(level: int) -> None:
    """The application's `logging.basicConfig(level=level)`, taking effect as in its own process.

    basicConfig does nothing while the root logger has handlers, and pytest has put its capture
    handlers there; they step aside for the call and come back (they write to no stream).
    """
    root = logging.getLogger()
    captures = list(root.handlers)
    for handler in captures:
        root.removeHandler(handler)
    try:
        logging.basicConfig(level=level)
    finally:
        for handler in captures:
            root.addHandler(handler)


async def test_an_app_logging_at_warning_gets_warnings_only_and_nothing_on_stdout(
    host: None, capsys: pytest.CaptureFixture[str]
) -> None:
    basic_config(logging.WARNING)  # the application's whole logging set-up
    async with EchoServer(CONFIG) as server:
        assert await echo_once(server.port, b"hello") == b"hello"
    captured = capsys.readouterr()
    assert captured.out == ""
    # basicConfig's handler writes to stderr: the warning reached it, the info records did not.
    assert "WARNING:echo_async:UDP echo listening beyond loopback" in captured.err
    assert "connection closed" not in captured.err
    assert "listening addresses" not in captured.err
    assert not structlog.is_configured()  # the library configured nothing


async def test_debug_records_reach_a_handler_on_echo_async_with_their_fields(
    host: None, capsys: pytest.CaptureFixture[str]
) -> None:
    basic_config(logging.DEBUG)
    records = Records()
    logging.getLogger("echo_async").addHandler(records)
    async with EchoServer(CONFIG) as server:
        assert await echo_once(server.port, b"hello") == b"hello"
    assert capsys.readouterr().out == ""
    (opened,) = [r for r in records.records if r.getMessage().startswith("connection opened")]
    (closed,) = [r for r in records.records if r.getMessage().startswith("connection closed")]
    assert opened.levelno == logging.DEBUG
    assert opened.name == "echo_async"
    assert closed.levelno == logging.INFO
    fields: dict[str, Any] = closed.__dict__
    assert fields["transport"] == "tcp"
    assert fields["bytes_in"] == fields["bytes_out"] == 5
    assert fields["reason"] == "eof"
    assert fields["peer"].startswith("127.0.0.1:")
    # A plain formatter shows the fields too: the message carries them.
    message = closed.getMessage()
    assert f"peer={fields['peer']}" in message
    assert "bytes_in=5" in message
    assert "bytes_out=5" in message
    assert "reason=eof" in message


async def test_no_open_records_while_echo_async_is_at_info(host: None) -> None:
    records = Records()
    ours = logging.getLogger("echo_async")
    ours.addHandler(records)
    ours.setLevel(logging.INFO)
    async with EchoServer(CONFIG) as server:
        assert server._state.log_opens is False  # not even formatted
        assert await echo_once(server.port, b"hi") == b"hi"
    messages = [record.getMessage() for record in records.records]
    assert any(message.startswith("connection closed") for message in messages)
    assert not any(message.startswith("connection opened") for message in messages)


async def test_a_host_that_configured_structlog_gets_the_records_through_structlog(
    host: None,
) -> None:
    records = Records()
    logging.getLogger("echo_async").addHandler(records)
    logging.getLogger("echo_async").setLevel(logging.DEBUG)
    with capture_logs() as captured:
        async with EchoServer(CONFIG) as server:
            assert await echo_once(server.port, b"hi") == b"hi"
    assert records.records == []
    (closed,) = [record for record in captured if record["event"] == "connection closed"]
    assert closed["bytes_in"] == 2


# -- the documented API ------------------------------------------------------------------------


def test_server_metrics_is_public_api() -> None:
    from echo_async import ServerMetrics

    assert "ServerMetrics" in echo_async.__all__
    assert ServerMetrics.__module__ == "echo_async.metrics"


def _python_blocks(markdown: Path) -> Iterator[str]:
    """The Python code blocks of a page, with snippet includes (`--8<-- "path"`) read in."""
    for block in re.findall(r"^```python\n(.*?)^```", markdown.read_text(), re.DOTALL | re.M):
        include = re.fullmatch(r'--8<-- "([^"]+)"\n', block)
        yield (ROOT / include.group(1)).read_text() if include else block


def test_every_name_the_embedding_page_imports_from_echo_async_exists() -> None:
    imported: list[tuple[str, str]] = []
    for block in _python_blocks(EMBEDDING):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("echo_async"):
                imported += [(node.module or "", alias.name) for alias in node.names]
    assert ("echo_async", "ServerMetrics") in imported
    missing = [
        f"from {module} import {name}"
        for module, name in imported
        if not hasattr(importlib.import_module(module), name)
    ]
    assert missing == []


def test_the_metrics_example_runs_and_counts_its_connection() -> None:
    (block,) = [block for block in _python_blocks(EMBEDDING) if "ServerMetrics(" in block]
    done = subprocess.run(
        [sys.executable, "-c", block],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("b'hello'\n")
    assert 'echo_bytes_received_total{transport="tcp"} 5.0' in done.stdout
    assert 'echo_connections_total{transport="tcp"} 1.0' in done.stdout


def test_every_public_name_is_in_the_api_reference() -> None:
    reference = (ROOT / "docs" / "api.md").read_text()
    public = [name for name in echo_async.__all__ if name != "__version__"]
    assert [name for name in public if f"::: echo_async.{name}\n" not in reference] == []


def test_the_api_reference_documents_every_field_of_stats() -> None:
    # mkdocstrings shows a field's docstring: the string right after its annotated assignment.
    source = (ROOT / "echo_async" / "server.py").read_text()
    stats = next(
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef) and node.name == "Stats"
    )
    body = stats.body
    fields = [
        (statement.target.id, body[index + 1] if index + 1 < len(body) else None)
        for index, statement in enumerate(body)
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
    ]
    assert "bytes_in" in [name for name, _ in fields]
    undocumented = [
        name
        for name, following in fields
        if not (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        )
    ]
    assert undocumented == []
