"""The CLI's loop choice: uvloop by default, asyncio when asked or when uvloop is missing."""

from __future__ import annotations

import asyncio
import sys

import pytest

from echo_async.loops import LoopUnavailable, choose_loop


def test_auto_prefers_uvloop() -> None:
    choice = choose_loop("auto")
    assert choice.name == "uvloop"
    assert choice.fallback is None
    loop = choice.factory()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()


def test_asyncio_when_asked() -> None:
    choice = choose_loop("asyncio")
    loop = choice.factory()
    try:
        assert isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()


def test_auto_falls_back_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` raise ImportError
    choice = choose_loop("auto")
    assert choice.name == "asyncio"
    assert choice.fallback is not None
    assert "uvloop" in choice.fallback


def test_uvloop_required_but_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(LoopUnavailable, match="uvloop can't be imported"):
        choose_loop("uvloop")


def test_unknown_loop() -> None:
    with pytest.raises(ValueError, match="unknown loop"):
        choose_loop("trio")
