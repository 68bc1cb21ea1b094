"""structlog configuration for the CLI: JSON lines or a console renderer, filtered by level.

Only the CLI calls `configure_logging`; the library just gets a logger, so an embedding
application's own structlog configuration applies to its records.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, TextIO

import structlog

from echo_async.config import LOG_FORMATS, LOG_LEVELS


def resolve_format(requested: str, stream: IO[str]) -> str:
    """`auto` is `console` on a terminal and `json` otherwise."""
    if requested != "auto":
        return requested
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def configure_logging(log_format: str, log_level: str, stream: TextIO | None = None) -> str:
    """Send structlog records to `stream` (default stdout) as JSON or console text; return which."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}")
    if log_level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {log_level!r}")
    output = stream if stream is not None else sys.stdout
    chosen = resolve_format(log_format, output)
    renderer: structlog.types.Processor
    if chosen == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=output.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[log_level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=output),
        cache_logger_on_first_use=True,
    )
    return chosen
