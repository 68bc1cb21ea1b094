"""The position-dependent pattern the clients send."""

from __future__ import annotations

from echo_async.bench import pattern


def test_the_pattern_is_not_one_repeated_byte() -> None:
    assert len(set(pattern.window(0, 4096))) > 200


def test_windows_wrap_around_the_period_seamlessly() -> None:
    whole = pattern.window(0, 2 * pattern.PERIOD)
    assert whole[: pattern.PERIOD] == whole[pattern.PERIOD :]
    start = pattern.PERIOD - 10
    assert pattern.window(start, 30) == whole[start : start + 30]
    long = pattern.window(7, pattern.SPAN * 2 + 5)
    assert long == (whole * 12)[7 : 7 + pattern.SPAN * 2 + 5]


def test_connections_start_at_different_positions() -> None:
    starts = {pattern.start_position(index) for index in range(1000)}
    assert len(starts) == 1000


def test_message_pool_holds_distinct_messages_of_the_size() -> None:
    messages = pattern.messages(1024)
    assert len(messages) > 2
    assert all(len(message) == 1024 for message in messages)
    assert len(set(messages)) == len(messages)


def test_differences_counts_and_locates() -> None:
    expected = pattern.window(0, 100)
    corrupted = bytearray(expected)
    corrupted[7] ^= 1
    corrupted[50] ^= 1
    assert pattern.differences(bytes(corrupted), expected) == (2, 7)
    assert pattern.differences(expected, expected) == (0, -1)
    assert pattern.differences(expected[:90], expected) == (10, 90)
