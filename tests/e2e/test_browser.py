"""A real browser on the ws:// listener: headless Chromium from the OS package.

The test serves `browser/ws_echo.html` and the messages to send from a small HTTP server of its
own; Chromium loads the page, whose script opens a WebSocket to each `ws` URL in its query
string, sends every message (text as text, binary as an ArrayBuffer), and POSTs what came back
to /report. The test compares the report with what it served. Chromium runs in its own session
with HOME in the test's tmp_path, and at the end it and every process it started are gone.

The last test runs the same page on a `websockets` stand-in that reorders, turns binary into
text, or drops a message, and checks that the comparison fails each time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from websockets.http11 import Request, Response
from websockets.sync.server import ServerConnection, serve

from echo_async import EchoServer, ServerConfig

DEADLINE_S = 30
pytestmark = [pytest.mark.slow, pytest.mark.timeout(DEADLINE_S)]

PAGE = Path(__file__).resolve().parent / "browser" / "ws_echo.html"
PATH = "/echo"
NO_CHROMIUM = "chromium is not installed (apt-get install chromium); .ci/run installs it"
# Within DEADLINE_S: the page's report, then the browser's exit, then its helpers' exit.
REPORT_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 3.0
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # its sandbox needs user namespaces, or refuses to run as root
    "--disable-gpu",
    "--disable-dev-shm-usage",  # a container's /dev/shm may be 64 MB
    "--no-proxy-server",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-extensions",
    "--enable-logging=stderr",  # the page's console, uncaught errors included, in its output
]
# Interleaved text and binary, each kind with an empty message; the binary ones include every
# byte value and bytes that happen to be valid UTF-8, which an echo must not turn into text.
MESSAGES: list[str | bytes] = [
    "hello, echo",
    bytes(range(256)),
    "héllo ✓ 𝄞",
    b"",
    "",
    random.Random(1).randbytes(100_000),
    "ü✓𝄞" * 10_000,
    b"binary, though it is valid UTF-8",
    "the end",
]


def summary(message: str | bytes) -> str:
    """The kind and a fingerprint of a message: a failed comparison reads as a short diff."""
    kind = "text" if isinstance(message, str) else "binary"
    if len(message) <= 40:
        return f"{kind} {message!r}"
    data = message.encode() if isinstance(message, str) else message
    return f"{kind} of length {len(message)}, sha256 {hashlib.sha256(data).hexdigest()[:16]}"


# -- what the browser saw ------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """One WebSocket the page opened, as the browser saw it."""

    url: str
    opened: bool
    replies: list[str | bytes]
    events: list[str]  # "open", "error", "close", in the order they fired
    close_code: int | None
    was_clean: bool | None
    error: str | None  # the page's: an exception, or replies that never came

    @classmethod
    def from_report(cls, record: dict[str, Any]) -> Session:
        replies: list[str | bytes] = []
        for reply in record["replies"]:
            if reply["type"] == "text":
                replies.append(reply["data"])
            elif reply["type"] == "binary":
                replies.append(base64.b64decode(reply["data"]))
            else:
                raise AssertionError(f"{record['url']}: a reply of type {reply['type']}")
        return cls(
            url=record["url"],
            opened=record["opened"],
            replies=replies,
            events=record["events"],
            close_code=record["closeCode"],
            was_clean=record["wasClean"],
            error=record["error"],
        )


def check_echo(session: Session, messages: list[str | bytes]) -> None:
    """Every message came back once, in order, as the same kind; then a clean close 1000."""
    assert session.opened, f"{session.url} did not open: {session.events}, {session.error}"
    replied = [summary(reply) for reply in session.replies]
    assert replied == [summary(message) for message in messages], f"{session.url}: replies differ"
    assert session.replies == messages
    assert session.error is None, session.error
    assert session.events == ["open", "close"], session.events
    assert (session.close_code, session.was_clean) == (1000, True)


def check_refused(session: Session) -> None:
    """The handshake failed: what a browser reports for a 404 (it never sees the status)."""
    assert not session.opened, f"{session.url} opened: {session.events}, {session.close_code}"
    assert session.replies == []
    assert session.events == ["error", "close"], session.events
    assert (session.close_code, session.was_clean) == (1006, False)


# -- the page's HTTP server ----------------------------------------------------------------------


class PageServer(ThreadingHTTPServer):
    """Serves the page and messages.json on 127.0.0.1; keeps the page's report."""

    def __init__(self, messages: list[str | bytes]) -> None:
        super().__init__(("127.0.0.1", 0), PageHandler)
        self.messages_json = json.dumps(
            [
                {"type": "text", "data": message}
                if isinstance(message, str)
                else {"type": "binary", "data": base64.b64encode(message).decode()}
                for message in messages
            ]
        ).encode()
        self.requests: list[str] = []  # what the browser asked for, for a failure's message
        self.report: dict[str, Any] = {}
        self.reported = threading.Event()


class PageHandler(BaseHTTPRequestHandler):
    server: PageServer

    def do_GET(self) -> None:
        self.server.requests.append(f"GET {self.path}")
        path = urlsplit(self.path).path
        if path == "/" + PAGE.name:
            self.send_body(PAGE.read_bytes(), "text/html; charset=utf-8")
        elif path == "/messages.json":
            self.send_body(self.server.messages_json, "application/json")
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        self.server.requests.append(f"POST {self.path}")
        if self.path != "/report":
            self.send_error(404)
            return
        self.server.report = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_body(b"", "text/plain")
        self.server.reported.set()

    def send_body(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # `requests` keeps what a failure needs; stderr stays quiet


# -- the browser ---------------------------------------------------------------------------------


def find_chromium() -> str | None:
    return shutil.which("chromium")


def live_processes_naming(marker: str) -> list[int]:
    """Processes, zombies aside, whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # it exited while we looked
        if marker.encode() in command_line and state != "Z":
            found.append(int(entry.name))
    return found


def stop_chromium(process: subprocess.Popen[bytes], home: Path) -> None:
    """End the browser, its zygote and renderers (its process group) and its crash handlers."""
    # SIGTERM first: the browser then reaps its own children instead of orphaning them.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(EXIT_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # The crashpad handlers detach into sessions of their own; their --database lies under HOME.
    # They exit once the browser has; any still there after EXIT_TIMEOUT_S are killed.
    started = time.monotonic()
    while left := live_processes_naming(str(home)):
        waited = time.monotonic() - started
        if waited > 2 * EXIT_TIMEOUT_S:
            raise AssertionError(f"chromium's processes {left} outlived SIGKILL")
        if waited > EXIT_TIMEOUT_S:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@contextlib.contextmanager
def chromium_showing(chromium: str, url: str, home: Path) -> Iterator[Path]:
    """Headless Chromium on `url`, HOME and profile under `home`; yields its output's path."""
    home.mkdir()
    output_path = home / "chromium.log"
    with output_path.open("wb") as output:
        process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={home / 'profile'}", url],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(home)},
            start_new_session=True,
        )
    try:
        yield output_path
    finally:
        stop_chromium(process, home)


def run_page(
    chromium: str, urls: list[str], tmp_path: Path, wait_ms: int = 10_000
) -> list[Session]:
    """Chromium runs the page on each of `urls` in turn; what it saw, one Session per URL.

    `wait_ms` bounds the page's wait for the replies; the whole run ends within DEADLINE_S.
    """
    with PageServer(MESSAGES) as http:
        serving = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05})
        serving.start()
        try:
            query = urlencode([*(("ws", url) for url in urls), ("wait", str(wait_ms))])
            page = f"http://127.0.0.1:{http.server_address[1]}/{PAGE.name}?{query}"
            with chromium_showing(chromium, page, tmp_path / "chromium") as output_path:
                if not http.reported.wait(REPORT_TIMEOUT_S):
                    # Without a session bus Chromium complains of D-Bus at length: not news.
                    lines = output_path.read_text(errors="replace").splitlines()
                    tail = "\n".join(line for line in lines if "dbus" not in line)[-3000:]
                    raise AssertionError(
                        f"no report within {REPORT_TIMEOUT_S} s; the browser asked for "
                        f"{http.requests}; its output ends:\n{tail}"
                    )
        finally:
            http.shutdown()
            serving.join()
    assert http.report["error"] is None, f"the page failed: {http.report['error']}"
    sessions = [Session.from_report(record) for record in http.report["sessions"]]
    assert [session.url for session in sessions] == urls
    return sessions


# -- a stand-in echo, to show the harness fails a broken one -------------------------------------


def _faithful(connection: ServerConnection) -> None:
    for message in connection:
        connection.send(message)


def _reordered(connection: ServerConnection) -> None:
    first, second = connection.recv(), connection.recv()
    connection.send(second)
    connection.send(first)
    _faithful(connection)


def _as_text(connection: ServerConnection) -> None:
    for message in connection:
        connection.send(message.decode("latin-1") if isinstance(message, bytes) else message)


def _dropped(connection: ServerConnection) -> None:
    for index, message in enumerate(connection):
        if index != 3:  # the empty binary message
            connection.send(message)


STAND_IN_PATHS: dict[str, Callable[[ServerConnection], None]] = {
    PATH: _faithful,
    "/reordered": _reordered,
    "/as-text": _as_text,
    "/dropped": _dropped,
}


@contextlib.contextmanager
def stand_in_echo() -> Iterator[str]:
    """A `websockets` echo on 127.0.0.1 whose path picks its behaviour; yields ws://HOST:PORT.

    Other paths get 404, as on the listener: `ws_url` can yield `base + PATH` from it instead.
    """

    def handler(connection: ServerConnection) -> None:
        assert connection.request is not None  # the handshake is done
        STAND_IN_PATHS[connection.request.path](connection)

    def route(connection: ServerConnection, request: Request) -> Response | None:
        if request.path not in STAND_IN_PATHS:
            return connection.respond(404, "Not Found\n")
        return None

    with serve(handler, "127.0.0.1", 0, process_request=route) as server:
        serving = threading.Thread(target=server.serve_forever)
        serving.start()
        try:
            yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
        finally:
            server.shutdown()
            serving.join()


# -- the tests -----------------------------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip(NO_CHROMIUM)
    return found


@pytest.fixture
async def ws_url() -> AsyncIterator[str]:
    """echo-async's ws:// listener on PATH, served by the test's own event loop."""
    config = ServerConfig(listen=[f"ws://127.0.0.1:0{PATH}"], shutdown_timeout=2)
    async with EchoServer(config) as server:
        yield server.addresses[0]


async def test_a_browser_gets_back_every_message_in_order_as_the_same_kind(
    chromium: str, ws_url: str, tmp_path: Path
) -> None:
    # In a thread: the event loop keeps serving the listener while the browser runs.
    [session] = await asyncio.to_thread(run_page, chromium, [ws_url], tmp_path)
    check_echo(session, MESSAGES)


async def test_a_browser_cannot_open_another_path(
    chromium: str, ws_url: str, tmp_path: Path
) -> None:
    base = ws_url.removesuffix(PATH)
    urls = [base + "/", base + "/elsewhere", ws_url]
    root, elsewhere, echo = await asyncio.to_thread(run_page, chromium, urls, tmp_path)
    check_refused(root)
    check_refused(elsewhere)
    check_echo(echo, MESSAGES)  # the same server and browser, on the configured path


def test_the_harness_fails_an_echo_that_reorders_turns_binary_into_text_or_drops(
    chromium: str, tmp_path: Path
) -> None:
    with stand_in_echo() as base:
        urls = [base + path for path in STAND_IN_PATHS]
        faithful, *broken = run_page(chromium, urls, tmp_path, wait_ms=2000)
    check_echo(faithful, MESSAGES)
    for session in broken:
        with pytest.raises(AssertionError, match="replies differ"):
            check_echo(session, MESSAGES)
