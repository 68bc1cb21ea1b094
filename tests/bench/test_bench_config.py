"""BenchConfig validation, targets, and splitting over processes."""

from __future__ import annotations

from typing import Any

import pytest

from echo_async.bench.config import BenchConfig, BenchConfigError


def config(**overrides: Any) -> BenchConfig:
    fields: dict[str, Any] = dict(mode="pingpong", connections=10, size=64, duration=1.0, port=7)
    fields.update(overrides)
    return BenchConfig(**fields)


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"unix_path": "/tmp/x"}, "--unix"),
        ({"port": None}, "--port"),
        ({"requests": 5}, "--duration"),
        ({"duration": None}, "--requests"),
        ({"connections": 0}, "--connections"),
        ({"size": 0}, "--size"),
        ({"mode": "hold", "duration": None, "requests": 5}, "--duration"),
        ({"udp": True, "mode": "stream"}, "--udp"),
        ({"tls_ca": "ca.pem"}, "--tls-ca"),
        ({"rate": 0}, "--rate"),
        ({"mode": "hold", "rate": 10}, "--rate"),
        ({"mode": "oneshot", "pipeline": 2}, "--pipeline"),
        ({"processes": 11}, "--processes"),
        ({"max_errors": -1}, "--max-errors"),
    ],
)
def test_invalid_options_name_the_flag(overrides: dict[str, Any], flag: str) -> None:
    with pytest.raises(BenchConfigError, match=flag):
        config(**overrides)


def test_targets_are_urls() -> None:
    assert config().target == "tcp://127.0.0.1:7"
    assert config(tls=True).target == "tls://127.0.0.1:7"
    assert config(udp=True).target == "udp://127.0.0.1:7"
    assert config(host="::1").target == "tcp://[::1]:7"
    assert config(port=None, unix_path="/run/echo.sock").target == "unix:///run/echo.sock"


def test_stream_keeps_a_256_kib_window_by_default() -> None:
    assert config(mode="stream", size=1024).depth == 256
    assert config(mode="stream", size=1024, pipeline=4).depth == 4
    assert config().depth == 1


def test_shares_add_up_to_the_whole() -> None:
    whole = config(connections=10, duration=None, requests=1001, rate=1000.0, connect_rate=100.0)
    shares = [whole.share(index, 3) for index in range(3)]
    assert [share.connections for share in shares] == [4, 3, 3]
    assert [share.connection_offset for share in shares] == [0, 4, 7]
    assert sum(share.requests or 0 for share in shares) == 1001
    assert sum(share.rate or 0 for share in shares) == pytest.approx(1000.0)
    assert sum(share.connect_rate or 0 for share in shares) == pytest.approx(100.0)
    assert all(share.processes == 1 for share in shares)


def test_config_round_trips_through_a_dict() -> None:
    original = config(tls=True, rate=5.0)
    assert BenchConfig(**original.to_dict()) == original


def test_a_missing_ca_file_is_a_config_error(tmp_path: Any) -> None:
    with pytest.raises(BenchConfigError, match="--tls-ca"):
        config(tls=True, tls_ca=str(tmp_path / "missing.pem")).ssl_context()
