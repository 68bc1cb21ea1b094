"""structlog configuration for the CLI: JSON lines or a console renderer, filtered by level.

Only the CLI calls `configure_logging`; the library just gets a logger, so an embedding
application's own structlog configuration applies to its records.

Every connection ends with a close record, so with many short connections the record is a
large part of a connection's cost. The pipeline is kept short for that: one JSON encoder made
once (not one per record), a timestamp that formats the date once a second, and lines written
together once per event-loop iteration instead of one write and flush per record.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import select
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

from echo_async.config import LOG_FORMATS, LOG_LEVELS

# The most one write may carry and still reach a pipe whole (4096 on Linux).
ATOMIC_WRITE = select.PIPE_BUF


def resolve_format(requested: str, stream: IO[str]) -> str:
    """`auto` is `console` on a terminal and `json` otherwise."""
    if requested != "auto":
        return requested
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


class LineWriter:
    """A structlog logger writing lines to a text stream, batched per event-loop iteration.

    In a running loop, lines wait in a list until a callback scheduled once per iteration
    writes them all and flushes, in writes a pipe keeps whole; outside one (start-up, shutdown)
    each line is written at once.
    `flush()` also runs at interpreter exit, so a clean exit loses nothing; a process killed
    hard loses at most the lines of its last loop iteration.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: list[str] = []
        # The loop a flush is scheduled on; a loop closed before running it leaves the lines
        # pending, and the next record (in another loop, or none) writes them.
        self._flush_on: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        with self._lock:
            self._pending.append(message)
            scheduled = self._flush_on
            if scheduled is not None and scheduled.is_running():
                return  # this iteration's flush is scheduled already
        try:
            loop = asyncio.get_running_loop()  # a getpid() system call: once per iteration
        except RuntimeError:
            self.flush()
            return
        with self._lock:
            if self._flush_on is not loop:
                self._flush_on = loop
                loop.call_soon(self.flush)

    # structlog calls the method named after the level; every level is a line.
    debug = info = warning = warn = error = critical = exception = log = failure = fatal = msg

    def flush(self) -> None:
        """Write every pending line now."""
        with self._lock:
            self._flush_on = None
            if not self._pending:
                return
            lines, self._pending = self._pending, []
        text = "\n".join(lines) + "\n"
        pieces = [text] if len(text) <= ATOMIC_WRITE and text.isascii() else None
        try:
            for piece in pieces or _whole_line_pieces(lines):
                self._stream.write(piece)
                self._stream.flush()
        except (ValueError, OSError):
            # Closed under us (at exit), or its reader is gone (EPIPE): nothing to write to.
            pass


def _whole_line_pieces(lines: list[str]) -> Iterator[str]:
    """`lines` joined into pieces of at most ATOMIC_WRITE bytes (a longer line goes alone).

    The supervisor and its workers share one stdout. A pipe keeps a write of up to PIPE_BUF
    bytes whole; a longer one may be split around other processes' writes, cutting a line of
    one worker with lines of another. So a batch leaves in pieces that end at a line end.
    """
    start = size = 0
    for index, line in enumerate(lines):
        # JSON lines are ASCII (the encoder escapes the rest); console text may not be.
        length = (len(line) if line.isascii() else len(line.encode("utf-8", "replace"))) + 1
        if size + length > ATOMIC_WRITE and index > start:
            yield "\n".join(lines[start:index]) + "\n"
            start, size = index, 0
        size += length
    yield "\n".join(lines[start:]) + "\n"


class LineWriterFactory:
    """One LineWriter for every logger (structlog's logger_factory)."""

    def __init__(self, stream: TextIO) -> None:
        self.writer = LineWriter(stream)

    def __call__(self, *args: Any) -> LineWriter:
        return self.writer


class IsoTimeStamper:
    """`timestamp` as ISO 8601 UTC with microseconds, like TimeStamper(fmt="iso", utc=True).

    The date and time up to the second are formatted once a second, not once a record.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


class AddFields:
    """Add fixed fields (a worker's number) to every record."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields = dict(fields)

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        for key, value in self._fields.items():
            event_dict.setdefault(key, value)
        return event_dict


# json.dumps with any keyword argument builds a new JSONEncoder per call, and JSONEncoder.encode
# builds a new C encoder per call; this C encoder is built once. Same output as json.dumps.
_MARKERS: dict[int, Any] = {}  # circular-reference check; empty again after every call
_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_ENCODE = (
    _C_ENCODER(
        _MARKERS,
        repr,
        json.encoder.encode_basestring_ascii,
        None,
        ": ",
        ", ",
        False,
        False,
        True,
    )
    if _C_ENCODER is not None
    else None
)
_FALLBACK = json.JSONEncoder(default=repr)


def _dumps(event_dict: EventDict, **_ignored: Any) -> str:
    if _ENCODE is None:  # a Python without the json C accelerator
        return _FALLBACK.encode(event_dict)
    try:
        return "".join(_ENCODE(event_dict, 0))
    except BaseException:
        _MARKERS.clear()  # an interrupted call may leave entries behind
        raise


def configure_logging(
    log_format: str,
    log_level: str,
    stream: TextIO | None = None,
    fields: Mapping[str, Any] | None = None,
) -> str:
    """Send structlog records to `stream` (default stdout) as JSON or console text; return which.

    `fields` are added to every record (the supervisor's workers add `worker`).
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}")
    if log_level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {log_level!r}")
    output = stream if stream is not None else sys.stdout
    chosen = resolve_format(log_format, output)
    renderer: structlog.types.Processor
    if chosen == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=output.isatty())
    processors: list[structlog.types.Processor] = []
    if fields:
        processors.append(AddFields(fields))
    processors += [
        structlog.processors.add_log_level,
        IsoTimeStamper(),
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[log_level.upper()]
        ),
        logger_factory=LineWriterFactory(output),
        cache_logger_on_first_use=True,
    )
    return chosen
