"""The event loop choice for the CLI: uvloop when it can be imported, else asyncio's own loop.

Only the CLI's run path calls this; the library never changes the host's loop or loop policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from echo_async.config import LOOP_CHOICES

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class LoopUnavailable(RuntimeError):
    """`--loop uvloop` was asked for but uvloop can't be imported."""


@dataclass(frozen=True, slots=True)
class LoopChoice:
    """Which loop runs, how to make it, and why (`fallback` says what went wrong with uvloop)."""

    name: str
    factory: LoopFactory
    fallback: str | None = None


def choose_loop(requested: str) -> LoopChoice:
    """Resolve `auto|uvloop|asyncio` to a loop factory; auto falls back to asyncio."""
    if requested not in LOOP_CHOICES:
        raise ValueError(f"unknown loop {requested!r}; choose from {', '.join(LOOP_CHOICES)}")
    if requested == "asyncio":
        return LoopChoice("asyncio", asyncio.new_event_loop)
    try:
        import uvloop
    except ImportError as error:
        if requested == "uvloop":
            raise LoopUnavailable(f"uvloop can't be imported: {error}") from None
        return LoopChoice("asyncio", asyncio.new_event_loop, fallback=str(error))
    return LoopChoice("uvloop", uvloop.new_event_loop)
