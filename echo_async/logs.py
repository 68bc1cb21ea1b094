"""How echo-async logs: the library follows its host; the CLI configures structlog.

`library_logger` is the logger an `EchoServer` takes when it starts. When the host application
configured structlog, that configuration applies; when it did not, records go to the stdlib
`logging` logger `echo_async`, so the host's logging levels and handlers apply and nothing is
printed that the host did not ask for. The library never configures either.

Only the CLI calls `configure_logging`: JSON lines or console text on stdout, filtered by level.
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
import re
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

# Keyword arguments of logging.Logger's methods: passed to logging as such, not as fields.
_LOGGING_KEYWORDS = ("exc_info", "stack_info", "stacklevel")
# A LogRecord's own attributes: logging refuses `extra` that would overwrite one (KeyError).
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# A field value written without quotes in a stdlib message.
_BARE_VALUE = re.compile(r'[^\s="\\]+')


def library_logger(name: str) -> Any:
    """The logger the library's records go through, as the host application set logging up.

    When the host configured structlog, its configuration applies (`structlog.get_logger`).
    Otherwise the records go to the stdlib `logging` logger `name`, through structlog's stdlib
    integration but without configuring structlog: the host's levels, handlers and filters
    apply, and a record below the logger's level is dropped before it is formatted. Take it
    when a server starts, so the host's configuration at that moment decides.
    """
    if structlog.is_configured():
        return structlog.get_logger(name).bind()
    return StdlibLogger(
        logging.getLogger(name),
        processors=[structlog.stdlib.filter_by_level, render_to_stdlib],
        context={},
    )


class StdlibLogger(structlog.stdlib.BoundLogger):
    """structlog's BoundLogger over a `logging.Logger`, with `is_enabled_for` on any version.

    structlog's own gained `is_enabled_for` in 26.1; echo-async supports 24.1 and later.
    """

    def is_enabled_for(self, level: int) -> bool:
        """Whether the stdlib logger (its level, its parents', `disabled`) lets `level` through."""
        return self._logger.isEnabledFor(level)


def render_to_stdlib(
    logger: WrappedLogger, name: str, event_dict: EventDict
) -> tuple[tuple[str], dict[str, Any]]:
    """The last processor for a stdlib logger: the message is `event key=value ...`.

    The fields also become attributes of the `LogRecord` (`record.peer`), except those a
    LogRecord owns already, for handlers and formatters that read them; `exc_info`,
    `stack_info` and `stacklevel` are passed to logging as its own keyword arguments.
    """
    keywords: dict[str, Any] = {
        key: event_dict.pop(key) for key in _LOGGING_KEYWORDS if key in event_dict
    }
    event = event_dict.pop("event", "")
    message = " ".join(
        [str(event), *(f"{key}={_field_text(value)}" for key, value in event_dict.items())]
    )
    keywords["extra"] = {
        key: value for key, value in event_dict.items() if key not in _RECORD_ATTRIBUTES
    }
    return (message,), keywords


def _field_text(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    if text.isprintable() and _BARE_VALUE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=False)


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
