"""The position-dependent byte pattern every bench client sends, and the checks against it.

Byte ``i`` of a connection's stream is ``PATTERN[(start + i) % PERIOD]``, where the pattern is a
fixed pseudo-random sequence: a dropped, duplicated, reordered or cross-connection byte shows up
as a mismatch, which a single repeated byte would hide. Each connection starts at a different
position so two connections never send the same bytes at the same offset.
"""

from __future__ import annotations

import operator
import random
from functools import cache

PERIOD = 65521
"""Length of the pattern before it repeats: a prime, so message sizes never line up with it."""

SPAN = 1 << 18
"""Longest slice taken from the ring in one piece; longer windows are joined from pieces."""

_SEED = 862  # RFC 862, the echo protocol


@cache
def ring() -> bytes:
    """The pattern followed by its first SPAN bytes, so any slice up to SPAN needs no wrap."""
    base = random.Random(_SEED).randbytes(PERIOD)
    repeats = SPAN // PERIOD + 1
    return (base * (repeats + 1))[: PERIOD + SPAN]


def start_position(connection_index: int) -> int:
    """Stream position where connection number ``connection_index`` starts its pattern."""
    return (connection_index * 4099) % PERIOD


def window(position: int, length: int) -> bytes:
    """The pattern bytes at stream positions ``[position, position + length)``."""
    data = ring()
    start = position % PERIOD
    if length <= SPAN:
        return data[start : start + length]
    pieces = []
    while length > 0:
        piece = min(length, SPAN)
        pieces.append(data[start : start + piece])
        start = (start + piece) % PERIOD
        length -= piece
    return b"".join(pieces)


@cache
def messages(size: int) -> tuple[bytes, ...]:
    """A pool of distinct ``size``-byte messages cut from the pattern, shared by a process.

    Pingpong connections cycle through it, each from a different turn, so consecutive messages
    differ and sending needs no copy. The pool holds at most about 32 MiB.
    """
    count = max(2, min(64, (32 << 20) // size))
    return tuple(window(start_position(turn), size) for turn in range(count))


def differences(data: bytes, expected: bytes) -> tuple[int, int]:
    """How many bytes of ``data`` differ from ``expected``, and the index of the first (-1).

    Bytes beyond the shorter of the two count as different.
    """
    count = sum(map(operator.ne, data, expected)) + abs(len(data) - len(expected))
    if count == 0:
        return 0, -1
    pairs = enumerate(zip(data, expected, strict=False))
    return count, next((index for index, (a, b) in pairs if a != b), min(len(data), len(expected)))
